"""The layers: the library (tlpipe/) never imports the stages (tasks/) or the flows (flows/),
the library has no import cycles, and every entry point reaches a stage through the one
wiring table (tasks/wiring.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.wiring import STAGES
from tlpipe.params import STAGES as STAGE_NAMES
from tlpipe.setting import (
    SETTINGS,
    get_exporter,
    get_setting,
    predictor,
    report_sections,
    row_rules,
    spec,
    validation_suite,
)

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path, *, module_level: bool) -> set[str]:
    """The absolute module names `path` imports (module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body if module_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(package: str) -> dict[str, Path]:
    """Every module under `package`, sub-packages (tlpipe.settings.*) included."""
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): p
        for p in sorted((ROOT / package).rglob("*.py"))
        if p.stem != "__init__"
    }


@pytest.mark.parametrize("module", sorted(_modules("tlpipe")))
def test_the_library_never_imports_the_app(module: str) -> None:
    # The CLI sits above everything and may start a flow.
    if module == "tlpipe.cli":
        return
    found = {
        n
        for n in _imports(_modules("tlpipe")[module], module_level=False)
        if n.split(".")[0] in ("tasks", "flows")
    }
    assert not found, f"{module} imports {sorted(found)}"


def test_the_library_has_no_import_cycles() -> None:
    modules = _modules("tlpipe")
    graph = {m: {n for n in _imports(p, module_level=True) if n in modules} for m, p in modules.items()}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path, m, n]))
            if n not in state:
                visit(n, [*path, m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_stages_import_no_other_stage() -> None:
    stage_modules = {f"tasks.{s}" for s in STAGE_NAMES}
    for module in stage_modules:
        found = _imports(ROOT / Path(*module.split(".")).with_suffix(".py"), module_level=False)
        assert not (found & stage_modules) - {module}, f"{module} imports {sorted(found & stage_modules)}"


def test_every_entry_point_goes_through_the_wiring_table() -> None:
    assert set(STAGES) == set(STAGE_NAMES)
    for stage, wiring in STAGES.items():
        assert wiring.function.startswith(f"tasks.{stage}:")
        assert callable(wiring.resolve())
        # `python -m tasks.<stage>` runs it through the table.
        main = ast.parse((ROOT / "tasks" / f"{stage}.py").read_text()).body[-1]
        assert isinstance(main, ast.If) and ast.unparse(main.body[-1]) == f"main({stage!r})", stage
    # The flow imports no stage module, only the table.
    flow_imports = _imports(ROOT / "flows" / "pipeline.py", module_level=False)
    assert {n for n in flow_imports if n.startswith("tasks")} == {"tasks.wiring"}


# The parts of a setting that run without torch: params are checked, data validated,
# bundles served and reports written on a machine that has none.
LIGHT_PARTS = ("", ".serve", ".report", ".rows", ".rules")


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_setting_has_every_part(name: str) -> None:
    assert spec(name).name == name
    assert get_setting(name).name == name
    assert get_exporter(name).setting == name
    assert callable(predictor(name)) and callable(validation_suite(name))
    assert callable(report_sections(name).shipped) and callable(row_rules(name).identity)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_settings_light_parts_import_no_torch(name: str) -> None:
    modules = [SETTINGS[name] + part for part in LIGHT_PARTS]
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        f"import importlib; [importlib.import_module(m) for m in {modules!r}]\n"
        "import tlpipe.serve, tlpipe.report, tasks.validate, tasks.prepare\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
