"""dvc.yaml names, for each stage, every project module its command runs: a change to any
of them makes the stage stale, so dvc.lock always records the code that made the outputs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "tlpipe")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _imports(path: Path, *, everywhere: bool) -> set[str]:
    """The project modules `path` imports (as repo-relative .py paths): anywhere in the file
    for a stage's entry module, at module level for the modules it pulls in."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree) if everywhere else tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    files = (Path(*name.split(".")).with_suffix(".py") for name in names if name.split(".")[0] in PACKAGES)
    return {f.as_posix() for f in files if (ROOT / f).exists()}


def _runs(module: str) -> set[str]:
    entry = Path(*module.split(".")).with_suffix(".py").as_posix()
    seen, todo = set(), [(entry, True)]
    while todo:
        path, everywhere = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += [(p, False) for p in _imports(ROOT / path, everywhere=everywhere)]
    return seen


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_name_every_module_it_runs(stage: str) -> None:
    cmd = STAGES[stage]["cmd"].split()
    assert cmd[:2] == ["python", "-m"], cmd
    missing = sorted(_runs(cmd[2]) - set(STAGES[stage]["deps"]))
    assert not missing, f"dvc.yaml stage {stage!r} runs modules it does not list as deps: {missing}"


def _keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize(
    "params_file",
    ["params.yaml", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("examples/*/params.yaml"))],
)
def test_every_param_a_stage_lists_is_in_the_params_file(params_file: str) -> None:
    """DVC reads the keys a stage lists from the file itself (not from tlpipe's defaults): a
    missing one fails the run when the stage is committed."""
    keys = _keys(yaml.safe_load((ROOT / params_file).read_text()))
    listed = {key for stage in STAGES.values() for key in stage.get("params", [])}
    assert not sorted(listed - keys), f"{params_file} lacks {sorted(listed - keys)}"
