"""Running the embedded SeaweedFS where only its S3 gateway can be reached.

SeaweedFS's master, volume and filer answer HTTP and gRPC without credentials; only the S3
gateway checks them. So the server runs in a network namespace of its own (util-linux
`unshare --user --map-root-user --net`, no privileges needed where the kernel allows user
namespaces), where its loopback is invisible to every other process. Its S3 gateway also
listens on a unix socket in a folder only its owner can enter, and `UnixForwarder` serves
that socket on a loopback TCP port of the host, the endpoint boto3 and DVC talk to: every
request there is checked by the gateway. `python -m tlpipe.isolation COMMAND...` is the step
inside the namespace that brings its loopback up and becomes COMMAND.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_CHUNK = 1 << 16
OPEN_PORTS = "the embedded store's internal ports are open to local users"


@functools.cache
def namespace_prefix() -> tuple[str, ...]:
    """The command prefix that starts a program in a network namespace of its own with its
    loopback up; empty where the machine does not allow it (no unshare, user namespaces
    disabled), found once per process by trying."""
    unshare = shutil.which("unshare")
    if unshare is None:
        log.warning("no util-linux unshare: %s", OPEN_PORTS)
        return ()
    prefix = (unshare, "--user", "--map-root-user", "--net", "--", sys.executable, "-m", __name__)
    probe = [*prefix, sys.executable, "-c", "pass"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        done = None
        reason = str(err)
    else:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    if done is None or done.returncode != 0:
        log.warning("cannot start a network namespace (%s): %s", reason, OPEN_PORTS)
        return ()
    return prefix


def loopback_up() -> None:
    """Bring up `lo` in this process's network namespace (a new one starts with it down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(_CHUNK):
            sink.sendall(data)
    # The other way may still be sending: close only this direction.
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class UnixForwarder:
    """A loopback TCP port whose every connection is joined to the unix socket `target`.

    Binds at construction (so the port is ours, not picked and hoped free); `start` serves
    in a daemon thread, `close` stops accepting and cuts open connections.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=f"s3-forward-{self.port}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(str(self.target))
            except OSError as err:
                log.debug("%s: %s", self.target, err)
                client.close()
                upstream.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            halves = [2]  # the directions still open; the last one to end closes both

            def half(source: socket.socket, sink: socket.socket, halves: list[int] = halves) -> None:
                _pipe(source, sink)
                with self._lock:
                    halves[0] -= 1
                    last = halves[0] == 0
                    if last:
                        self._open -= {source, sink}
                if last:
                    source.close()
                    sink.close()

            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=half, args=(a, b), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        with self._lock:
            still, self._open = self._open, set()
        for s in still:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m tlpipe.isolation COMMAND [ARG...]")
    loopback_up()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
