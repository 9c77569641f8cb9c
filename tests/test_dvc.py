"""dvc.yaml names, for each stage, every project module its command runs: a change to any
of them makes the stage stale, so dvc.lock always records the code that made the outputs."""

from __future__ import annotations

import ast
import inspect
import itertools
from pathlib import Path

import pytest
import yaml

from tasks.wiring import STAGES as WIRING
from tlpipe.setting import SETTINGS as REGISTRY

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "tlpipe")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> str | None:
    """The repo-relative file of a project module or package, None if there is none."""
    path = Path(*name.split("."))
    for f in (path.with_suffix(".py"), path / "__init__.py"):
        if (ROOT / f).is_file():
            return f.as_posix()
    return None


def _imports(path: Path, *, everywhere: bool) -> set[str]:
    """The project modules `path` imports (as repo-relative .py paths, a package as its
    __init__.py): anywhere in the file for a stage's entry module, at module level for the
    modules it pulls in."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree) if everywhere else tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    # A module run in a child process: `[sys.executable, "-m", "tlpipe.servecheck", ...]`.
    for node in ast.walk(tree):
        if isinstance(node, ast.List | ast.Tuple):
            values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            names |= {b for a, b in itertools.pairwise(values) if a == "-m" and isinstance(b, str)}
    files = (_module_file(name) for name in names if name.split(".")[0] in PACKAGES)
    return {f for f in files if f is not None}


# What the setting registry imports by name: a call of each function (in a stage's wiring
# inputs, or in a module the stage runs) imports that module of every setting package.
RESOLVERS = {
    "get_setting(": "setting",
    "get_exporter(": "export",
    "predictor(": "serve",
    "report_sections(": "report",
    "validation_suite(": "rules",
    "row_rules(": "rows",
}


def _runs(stage: str) -> set[str]:
    """Every project module a stage's command may run. The setting registry imports its
    packages by name: a setting's declaration (its package) wherever params are read, and
    the module a registry function names (RESOLVERS) where the stage calls it."""
    module = STAGES[stage]["cmd"].split()[2]
    entry = _module_file(module)
    assert entry is not None, module
    wiring = inspect.getsource(WIRING[stage].inputs)
    resolved = {part for call, part in RESOLVERS.items() if call in wiring}
    seen: set[str] = set()
    todo = [(entry, True)]
    while todo:
        while todo:
            path, everywhere = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            todo += [(p, False) for p in _imports(ROOT / path, everywhere=everywhere)]
            if path == "tlpipe/setting.py":
                todo += [(_module_file(package), False) for package in REGISTRY.values()]
            elif path != "tasks/wiring.py":  # the wiring: only the stage's own inputs count
                text = (ROOT / path).read_text()
                resolved |= {part for call, part in RESOLVERS.items() if call in text}
        todo = [
            (f, False)
            for part in resolved
            for package in REGISTRY.values()
            if (f := _module_file(f"{package}.{part}")) not in seen
        ]
    return seen


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(f"{d}/") for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_name_every_module_it_runs(stage: str) -> None:
    cmd = STAGES[stage]["cmd"].split()
    assert cmd[:2] == ["python", "-m"], cmd
    missing = sorted(p for p in _runs(stage) if not _covered(p, STAGES[stage]["deps"]))
    assert not missing, f"dvc.yaml stage {stage!r} runs modules it does not list as deps: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_code_dep_a_stage_lists_is_a_module_it_runs(stage: str) -> None:
    """No stale deps: a module the stage no longer runs (or that no longer exists) would
    make it re-run for changes that cannot touch its outputs."""
    code = [d for d in STAGES[stage]["deps"] if d.endswith(".py")]
    extra = sorted(set(code) - _runs(stage))
    assert not extra, f"dvc.yaml stage {stage!r} lists modules it does not run: {extra}"


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
