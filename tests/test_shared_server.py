"""`python -m stages.shared_server CMD`: one real Prefect temporary server for a whole command."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.project import REPO

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


TREE = """
import os, subprocess, sys, time
grandchild = subprocess.Popen(["sleep", "600"])
print("READY", os.getpid(), grandchild.pid, os.environ["PREFECT_API_URL"], flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """No such process, or only its zombie (dead, not yet reaped by its new parent)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_ends_the_command_tree_and_the_server(tmp_path, signum):
    """A CI cancel, `timeout`, a closed terminal or Ctrl-C: nothing of the tree keeps running or listening."""
    import httpx

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path)}
    shared = subprocess.Popen([sys.executable, "-m", "stages.shared_server", sys.executable, "-c", TREE], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    line = shared.stdout.readline()
    assert line.startswith("READY"), line
    child, grandchild, url = int(line.split()[1]), int(line.split()[2]), line.split()[3]
    try:
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        shared.send_signal(signum)
        assert shared.wait(timeout=60) == 128 + signum
        assert gone(child) and gone(grandchild), "the command's processes outlived shared_server"
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:  # whatever a failure left behind
        for group in (shared.pid, child):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass


STAGE = """
import sys, time
from stages.common import run_stage

def main(ctx):
    sys.stdout.write("READY\\n")  # not print(): the flow sends prints to its log
    sys.stdout.flush()
    time.sleep(600)

sys.exit(run_stage("probe", main, ("seed",)))
"""


def stage_project(tmp_path):
    """A project folder with the demo's params.yaml, and the environment of a stage run in it with
    PREFECT_API_URL unset (so the stage starts a temporary server of its own)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PYTHONPATH": str(REPO)}
    return project, env


def test_a_stage_killed_with_sigkill_leaves_no_server_running(tmp_path):
    """With PREFECT_API_URL unset a stage starts a temporary server of its own; kill -9 of the
    stage (no exit handler runs) must not leave that server running and listening."""
    import httpx
    import psutil

    project, env = stage_project(tmp_path)
    stage = subprocess.Popen([sys.executable, "-c", STAGE], cwd=project, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert stage.stdout.readline().strip() == "READY"
        tree = psutil.Process(stage.pid).children(recursive=True)
        ports = {c.laddr.port for p in tree for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert len(ports) == 1, f"expected the stage's server to listen on one port, found {ports}"
        port = ports.pop()
        assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=10).status_code == 200
        stage.kill()
        stage.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(gone(p.pid) for p in tree):
            time.sleep(0.1)
        assert all(gone(p.pid) for p in tree), "a process of the killed stage (its server?) still runs"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
    finally:  # whatever a failure left behind (the server is in the stage's session)
        try:
            os.killpg(stage.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


LOGGING_STAGE = """
import logging, sys
from stages.common import run_stage

def main(ctx):
    print("a print, sent to the flow's log")
    logging.getLogger("cascade_clip.probe").info("a log line")
    return {}

sys.exit(run_stage("probe", main, ("seed",)))
"""


@pytest.mark.slow  # a real stage with a server of its own: 30 s
def test_a_stage_on_its_own_server_sends_its_logs_before_the_server_stops(tmp_path):
    """A stage with PREFECT_API_URL unset (plain `dvc repro`) must not leave logs or events queued
    for its temporary server after stopping it: Prefect's clients then retry at exit, printing
    "Error logging to API" (and, in the demo's stages, holding each process 75-85 s)."""
    project, env = stage_project(tmp_path)
    done = subprocess.run([sys.executable, "-c", LOGGING_STAGE], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a print, sent to the flow's log" in done.stdout + done.stderr
    assert "Error logging to API" not in done.stdout + done.stderr
