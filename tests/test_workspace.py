"""Workspaces: a run on other params leaves the project as it is, shares its DVC cache, and
keeps in step with the project's files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project, tiny_params
from tlpipe.params import ParamsError, load_params
from tlpipe.stages import commit, is_up_to_date
from tlpipe.workspace import (
    WORKSPACES,
    WorkspaceError,
    parse_override,
    run_plan,
    with_overrides,
    workspace,
)

SEEDS = {"evaluate.seeds": [3, 4]}


@pytest.fixture
def project(tmp_path: Path, sample_csv: Path) -> Path:
    return make_project(tmp_path / "proj", sample_csv, tiny_params())


def test_overrides_set_dotted_keys_and_make_sections() -> None:
    raw = {"finetune": {"lr": 1e-4, "epochs": 2}}
    out = with_overrides(raw, {"finetune.lr": 3e-5, "evaluate.seeds": [0, 1]})
    assert out == {"finetune": {"lr": 3e-5, "epochs": 2}, "evaluate": {"seeds": [0, 1]}}
    assert raw == {"finetune": {"lr": 1e-4, "epochs": 2}}
    with pytest.raises(ParamsError, match=r"finetune.lr is 0.0001, not a section"):
        with_overrides(raw, {"finetune.lr.x": 1})
    with pytest.raises(ParamsError, match="not a dotted key"):
        with_overrides(raw, {"finetune..lr": 1})


def test_command_line_overrides_read_values_as_yaml() -> None:
    assert parse_override("finetune.lr=3e-5") == ("finetune.lr", 3e-5)
    assert parse_override("evaluate.seeds=[0, 1]") == ("evaluate.seeds", [0, 1])
    assert parse_override("data.source=null") == ("data.source", None)
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        parse_override("finetune.lr")


def test_a_bad_override_is_refused_naming_the_key(project: Path) -> None:
    with pytest.raises(ParamsError, match=r"finetune\.nope"):
        run_plan(project, None, {"finetune.nope": 1})
    with pytest.raises(ParamsError, match="no such params file"):
        run_plan(project, "examples/none.yaml", None)


def test_the_projects_own_params_run_in_the_project(project: Path) -> None:
    assert run_plan(project, None, None).workspace is None
    assert run_plan(project, "params.yaml", {}).workspace is None
    with workspace(project, project / "params.yaml", None) as root:
        assert root == project.resolve()
    assert not (project / WORKSPACES).exists()


def test_where_the_curve_runs_is_no_part_of_a_workspace(project: Path) -> None:
    """params' runs section changes no result: the same workspace whatever it holds, and
    the run reads it from there."""
    seeds = run_plan(project, None, SEEDS)
    remote = run_plan(project, None, {**SEEDS, "runs.dask_address": "tcp://scheduler:8786"})
    assert seeds.workspace is not None and remote.workspace == seeds.workspace
    assert remote.params.runs.dask_address == "tcp://scheduler:8786"
    assert run_plan(project, None, None).params.runs.runner is None
    assert seeds.params.evaluate.seeds == (3, 4)


@pytest.mark.faults
def test_one_run_at_a_time_holds_the_project(project: Path) -> None:
    """A second run in the project refuses at once, naming the run that holds it: `tlpipe run`
    before it starts any server or writes a log; the lock goes with its holder however that
    ends."""
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tlpipe.workspace import workspace\n"
        "with workspace(Path(sys.argv[1]), None, None):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(project)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        holder = f"another run holds this project: tlpipe pid {child.pid} (`-c {project}`), running since"
        with pytest.raises(WorkspaceError, match=re.escape(holder)), workspace(project, None, None):
            pytest.fail("a second run entered the project")
        tlpipe = Path(sys.executable).parent / "tlpipe"
        env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
        second = subprocess.run([str(tlpipe), "run"], cwd=project, capture_output=True, text=True, env=env)
        assert second.returncode == 1 and holder in second.stderr, second.stderr
        assert not (project / ".tlpipe/logs").exists() and not (project / ".prefect").exists()
    finally:
        child.kill()
        child.wait()
    with workspace(project, None, None) as root:
        assert root == project.resolve()


def test_a_workspace_leaves_the_project_and_shares_its_cache(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.wiring import run_stage

    monkeypatch.chdir(project)
    run_stage("prepare", load_params())
    commit("prepare")
    params_before = (project / "params.yaml").read_text()
    lock_before = (project / "dvc.lock").read_text()

    with workspace(project, None, SEEDS) as ws:
        assert ws.parent == (project / WORKSPACES).resolve()
        assert load_params(ws / "params.yaml").evaluate.seeds == (3, 4)
        # Every value is written out, as DVC reads the keys a stage lists.
        assert yaml.safe_load((ws / "params.yaml").read_text())["finetune"]["truncation"] == "head"
        # Code copied, data hard-linked, state shared.
        assert (ws / "tlpipe/workspace.py").read_text() == (project / "tlpipe/workspace.py").read_text()
        assert os.stat(ws / "data/raw/sample.csv").st_ino == os.stat(project / "data/raw/sample.csv").st_ino
        assert (ws / ".tlpipe").resolve() == (project / ".tlpipe").resolve()
        # prepare's params did not change: restored from the shared cache, up to date there.
        monkeypatch.chdir(ws)  # as the flow's task runs work
        assert (ws / "outputs/prepare").is_dir()
        assert is_up_to_date("prepare")
        assert not is_up_to_date("validate")
        # One run at a time holds it.
        held = pytest.raises(WorkspaceError, match="another run on the same params")
        with held, workspace(project, None, SEEDS):
            pass

    assert (project / "params.yaml").read_text() == params_before
    assert (project / "dvc.lock").read_text() == lock_before

    with workspace(project, None, {"prepare.seed": 7}) as other:
        assert other != ws
        monkeypatch.chdir(other)
        assert not is_up_to_date("prepare")


def test_a_workspace_follows_the_projects_files(project: Path) -> None:
    with workspace(project, None, SEEDS) as ws:
        pass
    (ws / "dvc.lock").write_text("stages: {}\n")  # the workspace's own record of its runs
    (project / "tlpipe/errors.py").write_text((project / "tlpipe/errors.py").read_text() + "\n# changed\n")
    (project / "tlpipe/new_module.py").write_text("X = 1\n")  # untracked, not ignored
    (project / "tlpipe/curve.py").unlink()
    (project / "data/raw/more.csv").write_text("text,sentiment\n")
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "\n")

    with workspace(project, None, SEEDS) as again:
        assert again == ws
        assert (ws / "tlpipe/errors.py").read_text().endswith("# changed\n")
        assert (ws / "tlpipe/new_module.py").is_file()
        assert not (ws / "tlpipe/curve.py").exists()
        assert (ws / "data/raw/more.csv").is_file()
        assert (ws / "dvc.lock").read_text() == "stages: {}\n"
        assert load_params(ws / "params.yaml").evaluate.seeds == (3, 4)
