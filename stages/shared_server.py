"""Run a command with one Prefect temporary server for all the stages it runs.

    python -m stages.shared_server dvc repro [ARGS...]      (what `make repro` runs)

With PREFECT_API_URL unset, every stage starts Prefect's temporary local server and stops it
again (measured: about 10 s more per stage on 2 CPU cores). This starts that same server once, hands its address
to the command in PREFECT_API_URL, and stops it when the command ends, however it ends. With
PREFECT_API_URL already set (a server of your own), the command just runs against it.
Exits with the command's exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys

import stages.common  # noqa: F401  (the temporary server's settings: no analytics, start-up time)

USAGE = "usage: python -m stages.shared_server COMMAND [ARGS...]   e.g. python -m stages.shared_server dvc repro"


def run_with_server(command: list[str]) -> int:
    if not command:
        print(USAGE, file=sys.stderr)
        return 2
    if os.environ.get("PREFECT_API_URL"):
        return call(command, os.environ)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    try:
        return call(command, {**os.environ, "PREFECT_API_URL": server.api_url})
    finally:
        server.stop()


def call(command: list[str], env) -> int:
    try:
        return subprocess.call(command, env=env)
    except FileNotFoundError:
        print(f"error: command not found: {command[0]} (is the project's environment active? `make repro` sets it up)",
              file=sys.stderr)
        return 127
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(run_with_server(sys.argv[1:]))
