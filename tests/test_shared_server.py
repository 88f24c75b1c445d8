"""`python -m stages.shared_server CMD`: one real Prefect temporary server for a whole command."""

import os
import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import os, sys, httpx
url = os.environ.get("PREFECT_API_URL")
print("URL", url)
if url and url.startswith("http://127.0.0.1"):
    print("HEALTH", httpx.get(url + "/health").status_code)
sys.exit(int(sys.argv[1]))
"""


def shared(*command, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "stages.shared_server", *command], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_command_gets_a_live_server_its_exit_code_is_kept_and_the_server_stops(tmp_path):
    done = shared(sys.executable, "-c", PROBE, "3", env_extra={"PREFECT_HOME": str(tmp_path)})
    assert done.returncode == 3, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("URL", "HEALTH")))
    assert lines["URL"].startswith("http://127.0.0.1:") and lines["URL"].endswith("/api")
    assert lines["HEALTH"] == "200"
    import httpx

    try:
        httpx.get(lines["URL"] + "/health", timeout=2)
    except httpx.TransportError:
        pass
    else:
        raise AssertionError("the temporary server is still answering after the command ended")


def test_a_server_of_your_own_is_used_as_it_is():
    done = shared(sys.executable, "-c", PROBE, "0", env_extra={"PREFECT_API_URL": "http://example.invalid/api"})
    assert done.returncode == 0, done.stderr
    assert "URL http://example.invalid/api" in done.stdout and "HEALTH" not in done.stdout


def test_missing_or_unknown_command_is_a_clear_error():
    assert shared().returncode == 2
    done = shared("no-such-command-xyz", env_extra={"PREFECT_API_URL": "http://example.invalid/api"})
    assert done.returncode == 127 and "command not found: no-such-command-xyz" in done.stderr
