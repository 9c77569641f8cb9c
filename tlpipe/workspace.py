"""Workspaces: the pipeline run on other params (a params file, overrides) without touching
the project's working tree, its params.yaml or its outputs.

A workspace is a copy of the project's files under `.tlpipe/workspaces/<params hash>/`, with
the resolved params written as its params.yaml. It is a DVC repo of its own (no git of its
own: the project's commit is the code it runs) that shares the project's DVC cache, so a
stage whose params, code and data are those of a run already cached is restored, not
computed again. Its `.tlpipe` is the project's: releases go to the same embedded store, and
timings to the same run records. The same params always reuse the same workspace, which
keeps its own dvc.lock between runs; one run at a time holds it, as one run at a time holds
the project itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tlpipe.errors import TlpipeError
from tlpipe.params import Params, ParamsError, load_params, parse_params, read_params_file

WORKSPACES = Path(".tlpipe/workspaces")
# Files a workspace has of its own: never copied over from the project after it is made.
OWN = ("params.yaml", "dvc.lock")
MANIFEST = ".tlpipe-workspace.json"
DATA = "data"
EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class WorkspaceError(TlpipeError):
    """A workspace could not be made, or it (or the project) is held by another run."""


# Held by a run in the project itself (a run in a workspace holds the workspace's lock).
PROJECT_LOCK = Path(".tlpipe/run.lock")


def _holder(fd: int) -> str:
    try:
        who = json.loads(os.pread(fd, 4096, 0))
        return f"tlpipe pid {who['pid']} (`{who['command']}`), running since {who['since']}"
    except (OSError, ValueError, LookupError, TypeError):
        return "a run that has not recorded itself yet"


@contextlib.contextmanager
def held(lock_path: Path, refusal: str) -> Iterator[None]:
    """Hold `lock_path` for the duration, recording in it who holds it. A second holder
    fails at once with WorkspaceError: `refusal` and who holds it. The kernel drops the lock
    with the process however it ends, so a killed run never leaves it held."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceError(f"{refusal}: {_holder(fd)}; wait for it to finish, or stop it") from None
        who = {
            "pid": os.getpid(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(who).encode(), 0)
        yield
    finally:
        os.close(fd)


def with_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`raw` with each dotted key (`finetune.optim.lr`) set to its value; sections are created as
    needed. A key through a value that is not a mapping raises ParamsError naming it."""
    out = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        if not all(keys):
            raise ParamsError(f"override {dotted!r}: not a dotted key such as finetune.optim.lr")
        node = out
        for depth, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ParamsError(
                    f"override {dotted!r}: {'.'.join(keys[: depth + 1])} is {node!r}, not a section"
                )
        node[keys[-1]] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML (`3e-5`, `[0, 1]`, `null`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {text!r}: expected KEY=VALUE, e.g. finetune.optim.lr=3e-5")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ParamsError(f"override {text!r}: the value is not valid YAML: {err}") from None
    # YAML 1.1 reads `3e-5` (no dot) as a string; 1.2 and every user read it as a number.
    return key.strip(), float(parsed) if isinstance(parsed, str) and EXPONENT.fullmatch(parsed) else parsed


def resolve(params_file: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Every params value for a run: the file, then the overrides, validated (ParamsError
    names each bad key) and written out in full, as DVC reads the keys a stage lists."""
    raw = with_overrides(read_params_file(params_file), overrides)
    source = f"{params_file} with overrides" if overrides else str(params_file)
    return parse_params(raw, source).as_dict()


# Sections no result depends on: a run's workspace is the same whatever they hold.
UNHASHED = ("runs",)


def params_hash(resolved: Mapping[str, Any]) -> str:
    hashed = {k: v for k, v in resolved.items() if k not in UNHASHED}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]


def _project_files(project: Path) -> list[str]:
    """What a workspace copies: the files git tracks or would track (the code, dvc.yaml,
    .dvc/config), then every file under data/, which is DVC's and often git-ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        raise WorkspaceError(f"{project}: not a git repository: {listed.stderr.strip()}")
    files = {f for f in listed.stdout.split("\0") if f and (project / f).is_file()}
    for path in (project / DATA).rglob("*"):
        if path.is_file():
            files.add(path.relative_to(project).as_posix())
    return sorted(files)


def _same(a: Path, b: Path) -> bool:
    if not b.is_file() or b.is_symlink():
        return False
    sa, sb = a.stat(), b.stat()
    return (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev) or (
        sa.st_size == sb.st_size and int(sa.st_mtime) == int(sb.st_mtime)
    )


def _place(src: Path, dest: Path, link: bool) -> None:
    """`dest` becomes a copy of `src` (data files: a hard link where the filesystem allows),
    swapped in atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tlpipe-tmp")
    tmp.unlink(missing_ok=True)
    try:
        if not link:
            raise OSError(errno.EXDEV, "copy")
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def sync(project: Path, ws: Path) -> list[str]:
    """Bring `ws` up to the project's files: new and changed ones copied (data hard-linked),
    ones the project no longer has removed. The workspace's own params.yaml and dvc.lock
    stay (a new workspace starts from the project's dvc.lock). Returns the files synced."""
    files = _project_files(project)
    manifest = ws / MANIFEST
    before = set(json.loads(manifest.read_text())["files"]) if manifest.is_file() else set()
    for name in before - set(files):
        (ws / name).unlink(missing_ok=True)
    for name in files:
        if name in OWN and (ws / name).exists():
            continue
        src, dest = project / name, ws / name
        if not _same(src, dest):
            _place(src, dest, link=name.startswith(f"{DATA}/"))
    manifest.write_text(json.dumps({"project": str(project), "files": files}, indent=1) + "\n")
    return files


def _dvc_config(project: Path, ws: Path) -> None:
    """The workspace's DVC: no git of its own, the project's cache."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        cache = repo.cache.local_cache_dir
    (ws / ".dvc").mkdir(exist_ok=True)
    (ws / ".dvc/config.local").write_text(f"[core]\n    no_scm = true\n[cache]\n    dir = {cache}\n")


def _link_state(project: Path, ws: Path) -> None:
    """The workspace's `.tlpipe` is the project's (store, timings, run records)."""
    link = ws / ".tlpipe"
    if link.is_symlink() and link.resolve() == (project / ".tlpipe").resolve():
        return
    if link.exists() or link.is_symlink():
        raise WorkspaceError(f"{link} exists and is not the project's .tlpipe")
    (project / ".tlpipe").mkdir(exist_ok=True)
    link.symlink_to((project / ".tlpipe").resolve(), target_is_directory=True)


def _checkout(ws: Path) -> None:
    """Restore every output the workspace's dvc.lock records and the cache holds, so DVC
    finds those stages up to date instead of running them again."""
    from dvc.exceptions import CheckoutError
    from dvc.repo import Repo

    lock = ws / "dvc.lock"
    locked = list((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.is_file() else []
    if not locked:
        return
    # An output the cache lacks is left out: its stage runs. DVC resolves a nested repo's
    # outputs against the current directory.
    with contextlib.chdir(ws), Repo(str(ws)) as repo, contextlib.suppress(CheckoutError):
        repo.checkout(targets=locked, allow_missing=True, force=True)


def _plan(
    project: Path, params_file: Path | str | None, overrides: Mapping[str, Any] | None
) -> tuple[Path, dict[str, Any]] | None:
    path = Path(params_file or "params.yaml")
    path = path if path.is_absolute() else project / path
    if not overrides and path.resolve() == (project / "params.yaml").resolve():
        return None
    resolved = resolve(path, overrides or {})
    return project / WORKSPACES / params_hash(resolved), resolved


@dataclass(frozen=True)
class RunPlan:
    """Where a run happens (`workspace`: None for the project itself, else the workspace's
    path) and the params it reads."""

    workspace: Path | None
    params: Params


def run_plan(project: Path, params_file: Path | str | None, overrides: Mapping[str, Any] | None) -> RunPlan:
    """The plan of a run on these arguments: the project itself for no params file but its
    own params.yaml and no overrides, else the workspace of those params. Validates the
    params (ParamsError)."""
    project = project.resolve()
    plan = _plan(project, params_file, overrides)
    if plan is None:
        return RunPlan(None, load_params(project / "params.yaml"))
    return RunPlan(plan[0], parse_params(plan[1]))


def _lock(project: Path, ws: Path | None) -> tuple[Path, str]:
    """The lock a run in workspace `ws` (None: in the project itself) holds, and what a second
    run is told."""
    if ws is None:
        return project / PROJECT_LOCK, f"{project}: another run holds this project"
    return ws.parent / f"{ws.name}.lock", f"{ws}: another run on the same params holds this workspace"


def refuse_if_held(project: Path, plan: RunPlan) -> None:
    """Fail at once with WorkspaceError, naming the holder, where another run holds what a run
    on `plan` would hold; the run takes the lock itself for its whole length (`workspace`)."""
    with held(*_lock(project.resolve(), plan.workspace)):
        pass


@contextlib.contextmanager
def workspace(
    project: Path, params_file: Path | str | None, overrides: Mapping[str, Any] | None
) -> Iterator[Path]:
    """The workspace for these params, synced, checked out and held for one run (a second
    run on the same params fails at once, naming the workspace and its holder). Yields its
    path; for the project's own params, the project itself, as it is, held the same way."""
    project = project.resolve()
    plan = _plan(project, params_file, overrides)
    if plan is None:
        with held(*_lock(project, None)):
            yield project
        return
    ws, resolved = plan
    ws.mkdir(parents=True, exist_ok=True)
    with held(*_lock(project, ws)):
        sync(project, ws)
        text = yaml.safe_dump(resolved, sort_keys=False)
        if not (ws / "params.yaml").is_file() or (ws / "params.yaml").read_text() != text:
            (ws / "params.yaml").write_text(text)
        _dvc_config(project, ws)
        _link_state(project, ws)
        _checkout(ws)
        yield ws
