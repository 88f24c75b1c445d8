"""Prefect's temporary local server, tied to the process that starts it.

Prefect starts that server as a child process and stops it at exit; a process killed with SIGKILL
(the OOM killer, `kill -9`, a CI runner's hard stop) never reaches its exit handlers, and the
server would keep running and listening. Here a small watchdog process, which the kernel signals
when its parent dies (Linux's PR_SET_PDEATHSIG), stops the server then. Elsewhere (no prctl) the
server is started the same way, without the watchdog.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("cascade_clip.stages")

# Runs in the watchdog process: waits for its parent's death (or SIGTERM), then ends the server.
# argv: parent pid, server pid. The signal is blocked first, so one that arrives early waits.
WATCHDOG = """
import ctypes, os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() == parent:  # else the parent died before prctl: act now
    signal.sigwait({signal.SIGTERM})
try:
    os.kill(server, signal.SIGTERM)
    for _ in range(100):
        time.sleep(0.05)
        os.kill(server, 0)
    os.kill(server, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def start_watchdog(server_pid: int) -> subprocess.Popen | None:
    """A process that ends `server_pid` when this process dies, however it dies (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import os

    return subprocess.Popen([sys.executable, "-S", "-c", WATCHDOG, str(os.getpid()), str(server_pid)],
                            stdin=subprocess.DEVNULL)


@contextmanager
def temporary_server() -> Iterator[str]:
    """Start Prefect's temporary server for the block (its API URL is yielded) and stop it after;
    if this process is killed, the watchdog stops it."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    watchdog = start_watchdog(server.server_process.pid)
    log.info("Prefect temporary server on %s (pid %d)", server.api_url, server.server_process.pid)
    try:
        yield server.api_url
    finally:
        drain_prefect_clients()
        if watchdog is not None:  # first, so that it cannot act on a pid the OS may reuse
            watchdog.kill()
            watchdog.wait()
        server.stop()


def drain_prefect_clients(timeout: float = 10.0) -> None:
    """Send what the flow left queued for the server (its logs and events) while the server is up.

    Left queued, they are sent at the process's exit, to a server already stopped, and Prefect's
    clients retry for over a minute before giving up ("Error logging to API"): every stage run by
    plain `dvc repro` took 75-85 s longer than its flow."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout)
    EventsWorker.drain_all(timeout=timeout)
