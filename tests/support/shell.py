"""Command lines as a user types them: ``bash`` with the project's venv first on PATH.

The end-to-end tests of the README and of ``mtrank demo`` run the documented commands, not Python
calls that stand in for them. :func:`run_line` runs one line to completion (a failure raises with
the command's output); :class:`BackgroundLine` runs a server line in its own session, waits until
``/readyz`` answers 200 and stops it with SIGTERM to that session (SIGKILL after a deadline).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from harness.processes import LOOPBACK, LoggedProcess, http_get

VENV_BIN = Path(sys.executable).parent  # holds the `mtrank` console script


def user_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any MTRANK_* setting, the venv first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_line(
    line: str, cwd: Path, env: Mapping[str, str], timeout_s: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """``bash -euo pipefail -c line`` (every command of a ``a; b`` line must succeed)."""
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", line],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"`{line}` exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


class BackgroundLine(LoggedProcess):
    """A server started by a command line, ready when ``http://127.0.0.1:PORT/readyz`` is 200."""

    proc_name = "command"

    def __init__(self, line: str, cwd: Path, env: Mapping[str, str], port: int) -> None:
        self.line, self.cwd, self.env = line, cwd, dict(env)
        self.base_url = f"http://{LOOPBACK}:{port}"
        self.log_path = cwd / f"background-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> BackgroundLine:
        self.proc_name = f"`{self.line}`"
        # A session of its own: stop() signals the shell and everything it started, no more.
        self._spawn(["bash", "-c", self.line], cwd=self.cwd, env=self.env, start_new_session=True)

        def ready() -> bool:
            try:
                status, _ = http_get(self.base_url + "/readyz", timeout_s=1.0)
            except OSError:
                return False
            return status == 200

        self._wait_ready(ready, timeout_s)
        return self

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM to the line's session, SIGKILL if it has not exited in time; the exit code."""
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                rc = self.proc.wait(timeout=10)
        self.proc = None
        return rc
