"""`tlpipe notify` on a real Prefect server: a run that fails reaches a real webhook, with
the failing stage's own message."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from tests.conftest import make_project, prefect_server, tiny_params

pytestmark = [pytest.mark.slow, pytest.mark.faults]

TLPIPE = str(Path(sys.executable).parent / "tlpipe")
NOTICE_TIMEOUT_S = 120.0


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_failed_run_is_told_to_the_webhook_with_its_stage_message(tmp_path: Path, sample_csv: Path) -> None:
    """`tlpipe notify --webhook` registers the automation; a `tlpipe run` against the same
    server whose target file is gone fails in prepare, and the webhook gets a JSON POST
    naming the run as Failed with prepare's message. Registering again replaces the
    automation rather than adding a second one; without PREFECT_API_URL it refuses."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_port}/hook"
    project = make_project(tmp_path / "proj", sample_csv, tiny_params())
    register = [TLPIPE, "notify", "--webhook", url]
    try:
        with prefect_server(tmp_path) as (api, env):
            for _ in range(2):
                done = subprocess.run(register, env=env, capture_output=True, text=True)
                assert done.returncode == 0, done.stderr
            with temporary_settings(updates={PREFECT_API_URL: api}):
                assert Automation.read(name="tlpipe run failed").enabled
                with get_client(sync_client=True) as client:
                    assert [a.name for a in client.read_automations()] == ["tlpipe run failed"]

            (project / "data/raw/sample.csv").unlink()
            run = subprocess.run([TLPIPE, "run"], cwd=project, env=env, capture_output=True, text=True)
            assert run.returncode == 1, run.stdout + run.stderr
            deadline = time.monotonic() + NOTICE_TIMEOUT_S
            while not _Hook.received and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _Hook.received, (
                f"no notification within {NOTICE_TIMEOUT_S:.0f} s; the run said: {run.stderr}"
            )
            notice = _Hook.received[0]
            assert notice["subject"].startswith("tlpipe: ") and notice["subject"].endswith("Failed")
            assert "ended Failed" in notice["text"] and "sample.csv" in notice["text"], notice

        refused = subprocess.run(
            register,
            env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 1 and "PREFECT_API_URL is not set" in refused.stderr
    finally:
        hook.shutdown()
