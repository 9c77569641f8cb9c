"""The embedded store as a SeaweedFS cluster: a master, volume servers, a filer and an S3
gateway, each a process of its own, kept running by a supervisor.

`python -m tlpipe.cluster SPEC` is the supervisor (tlpipe.store starts it in the store's
network namespace when it has one, so the parts reach each other on a loopback no one else
sees). SPEC is a JSON file: the parts in start order, each a name, a command and the port
it serves once up, and the seconds to wait before restarting a part that exits. It starts
each part once the one before it listens, and writes the parts' process ids to the `state`
file the spec names. A part that exits while the cluster runs (a volume server killed, say)
is started again after `restart_delay_s`, its exit and restart logged; with the master's
replication set, a volume server's data is also on another one while it is away. SIGTERM or
SIGINT stops the parts in reverse order (SIGTERM, then SIGKILL after `stop_timeout_s`).
Each part gets SIGTERM if the supervisor dies, even by SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlpipe.processes import die_with_parent

START_TIMEOUT_S = 60.0


@dataclass
class Part:
    """One process of the cluster."""

    name: str
    command: list[str]
    port: int
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self, cwd: Path, hold_fd: int | None) -> None:
        # Each part holds the store's lock too, so a new store waits for the last of them.
        self.proc = subprocess.Popen(
            [*die_with_parent(), *self.command],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            pass_fds=() if hold_fd is None else (hold_fd,),
        )


@dataclass
class Supervisor:
    parts: list[Part]
    cwd: Path
    state: Path
    restart_delay_s: float
    stop_timeout_s: float
    hold_fd: int | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Supervisor:
        return cls(
            [Part(p["name"], p["command"], p["port"]) for p in spec["parts"]],
            Path(spec["cwd"]),
            Path(spec["state"]),
            float(spec["restart_delay_s"]),
            float(spec["stop_timeout_s"]),
            spec.get("hold_fd"),
        )

    def run(self) -> int:
        """Start every part, keep them running until told to stop, then stop them. Returns
        the exit status: 0 after a stop, the part's own status if one exits while starting."""
        try:
            for part in self.parts:
                part.start(self.cwd, self.hold_fd)
                code = self._wait_listening(part)
                if code is not None:
                    _say(f"{part.name} exited with code {code} while starting")
                    return code or 1
                _say(f"{part.name} (pid {part.proc.pid if part.proc else '?'}) listens on port {part.port}")
            self._write_state()
            while not self.stopping.wait(0.2):
                for part in self.parts:
                    if part.proc is not None and (code := part.proc.poll()) is not None:
                        self._restart(part, code)
            return 0
        finally:
            self._stop_all()

    def _wait_listening(self, part: Part) -> int | None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not self.stopping.is_set():
            assert part.proc is not None
            if (code := part.proc.poll()) is not None:
                return code
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", part.port)) == 0:
                    return None
            time.sleep(0.1)
        return None if self.stopping.is_set() else 1

    def _restart(self, part: Part, code: int) -> None:
        _say(f"{part.name} exited with code {code}; starting it again in {self.restart_delay_s:g} s")
        if self.stopping.wait(self.restart_delay_s):
            return
        part.restarts += 1
        part.start(self.cwd, self.hold_fd)
        if self._wait_listening(part) is None:
            _say(f"{part.name} (pid {part.proc.pid if part.proc else '?'}) is back on port {part.port}")
        self._write_state()

    def _write_state(self) -> None:
        state = {
            p.name: {"pid": p.proc.pid if p.proc else None, "port": p.port, "restarts": p.restarts}
            for p in self.parts
        }
        tmp = self.state.with_name(f".{self.state.name}.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state)

    def _stop_all(self) -> None:
        for part in reversed(self.parts):
            proc = part.proc
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.state.unlink(missing_ok=True)


def _say(line: str) -> None:
    print(f"tlpipe.cluster: {line}", flush=True)


def main(argv: list[str]) -> None:
    supervisor = Supervisor.of(json.loads(Path(argv[0]).read_text()))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: supervisor.stopping.set())
    sys.exit(supervisor.run())


if __name__ == "__main__":
    main(sys.argv[1:])
