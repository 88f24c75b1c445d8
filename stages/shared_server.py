"""Run a command with one Prefect temporary server for all the stages it runs.

    python -m stages.shared_server dvc repro [ARGS...]      (what `make repro` runs)

With PREFECT_API_URL unset, every stage starts Prefect's temporary local server and stops it
again (measured: about 10 s more per stage on 2 CPU cores). This starts that same server once, hands its address
to the command in PREFECT_API_URL, and stops it when the command ends, however it ends. With
PREFECT_API_URL already set (a server of your own), the command just runs against it.

SIGTERM, SIGHUP and SIGINT (a CI cancel, `timeout`, a closed terminal, Ctrl-C) are passed on to
the command's whole process group (`dvc repro` and the stage it runs); whatever of that group is
still there after a grace period is killed, and the server is stopped: nothing is left running.
The server also stops if this process is killed with SIGKILL (stages.prefect_server).
Exits with the command's exit code, or 128 + the signal's number when stopped by one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import stages.common  # noqa: F401  (the temporary server's settings: no analytics, start-up time)
from stages.prefect_server import temporary_server

USAGE = "usage: python -m stages.shared_server COMMAND [ARGS...]   e.g. python -m stages.shared_server dvc repro"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
GRACE_SECONDS = 10.0  # after a stop signal, how long the command's processes get to end before SIGKILL


class Stopped(BaseException):  # not an Exception: nothing on the way may swallow it
    """A stop signal arrived before the command started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Runner:
    """Runs the command in its own process group and passes stop signals on to that group."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.signum: int | None = None

    def on_signal(self, signum: int, _frame) -> None:
        self.signum = self.signum or signum
        if self.child is None:
            raise Stopped(signum)
        _signal_group(self.child.pid, signum)

    def call(self, command: list[str], env) -> int:
        try:
            self.child = subprocess.Popen(command, env=env, start_new_session=True)
        except FileNotFoundError:
            print(f"error: command not found: {command[0]} (is the project's environment active? `make repro` sets it up)",
                  file=sys.stderr)
            return 127
        try:
            code = self.child.wait()
        finally:
            end_group(self.child.pid)
        return 128 + self.signum if self.signum else code


@contextmanager
def stop_signals_to(handler) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to a process group; False when none of it is left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def end_group(pgid: int, grace: float = GRACE_SECONDS) -> None:
    """Make sure no process of the group is left: SIGTERM, then SIGKILL after `grace` seconds."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


def run_with_server(command: list[str]) -> int:
    if not command:
        print(USAGE, file=sys.stderr)
        return 2
    runner = Runner()
    with stop_signals_to(runner.on_signal):
        try:
            if os.environ.get("PREFECT_API_URL"):
                return runner.call(command, os.environ)
            with temporary_server() as url:
                return runner.call(command, {**os.environ, "PREFECT_API_URL": url})
        except Stopped as stop:
            return 128 + stop.signum


if __name__ == "__main__":
    raise SystemExit(run_with_server(sys.argv[1:]))
