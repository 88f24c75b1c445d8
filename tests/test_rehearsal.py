"""The researcher's real path, rehearsed end to end on this CPU with nothing mocked:

- a miniature PASCAL VOC 2012 + SBD in the official archive formats, served over HTTP on 127.0.0.1
  and fetched by `prepare_data` through the real download, checksum, extraction and conversion code
  (params dataset.mirrors point the two sources at the test's server and its checksums);
- the `voc12` preset with only its size keys shrunk, on a tiny open_clip ViT made here as the
  `clip.source: file` backbone;
- two experiments queued with `cascade-clip queue` and run by a real `dvc queue start`, while a
  deployment from prefect.yaml runs as a flow on a real Prefect worker (process work pool, the
  session's local Prefect server) in a clone of its own, sharing outputs through a local DVC remote;
- afterwards, with every temporary workspace gone: `cascade-clip compare` lists the three
  executions with their hIoU, and `compare --register` registers one whose model loads and predicts.
"""

import hashlib
import json
import re
import subprocess
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from pipeline.compare import load_registered_model
from pipeline.config import deep_merge
from pipeline.model.clip import create_clip
from pipeline.tracking import TAG_DVC_EXP, TAG_PARENT_RUN, TAG_ROLE, TAG_STAGE
from tests.fake_datasets import make_voc
from tests.project import copy_project, venv_env
from tests.tiny import tiny_params_yaml

pytestmark = pytest.mark.slow

ARCH = {  # a 12-block ViT (the paper's stage split) of width 32, patch 8, and a 1-layer text tower
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 12, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SHRUNK = {  # the size keys of presets/voc12.yaml, at the test's size; everything else is the paper's recipe
    "model": {"image_size": 32},
    "train": {"iterations": 8, "batch_size": 2, "warmup_iters": 1, "crop_size": 32, "scale": [64, 32], "checkpoint_every": 4},
    "self_train": {"iterations": 4, "warmup_iters": 1, "batch_size": 2},
    "evaluate": {"short_side": 32, "max_long_side": 64, "crop_size": 32, "stride": 24},
}
DEPLOYMENT = "cascade-clip-pipeline/voc12-inductive-st"
FLOW_EXPERIMENT = "voc12-uncalibrated"
TIMEOUT_S = 1200


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def run(args: list[str], cwd: Path, env: dict, timeout: float = 600) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


class MirrorHandler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:
        MirrorHandler.requests.append(self.path)


def serve(folder: Path) -> ThreadingHTTPServer:
    """A plain HTTP server for `folder` on 127.0.0.1 (the test's dataset mirror); requested paths in
    MirrorHandler.requests."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(MirrorHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def make_project(root: Path, mirror_url: str, fake, clip_file: Path, arch_file: Path) -> Path:
    """A copy of the project: params.yaml at the test size with dataset voc12 from the mirror, the voc12
    preset's size keys shrunk and its backbone the tiny ViT, a local DVC remote; all committed."""
    repo = copy_project(root / "repo")
    mirrors = {"voc2012": {"url": f"{mirror_url}/{fake.voc_tar.name}", "md5": md5(fake.voc_tar)},
               "sbd": {"url": f"{mirror_url}/{fake.sbd_tgz.name}", "md5": md5(fake.sbd_tgz)}}
    (repo / "params.yaml").write_text(tiny_params_yaml({"dataset": {"name": "voc12", "workers": 1, "mirrors": mirrors}}))
    preset = yaml.safe_load((repo / "presets/voc12.yaml").read_text())
    preset = deep_merge(preset, {**SHRUNK, "clip": {"source": "file", "file": str(clip_file), "arch": str(arch_file)}})
    (repo / "presets/voc12.yaml").write_text(yaml.safe_dump(preset, sort_keys=False))
    env = venv_env()
    run(["dvc", "remote", "add", "--default", "shared", str(root / "remote")], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "rehearsal settings"], repo, env)
    return repo


def wait(condition, what: str, timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(3)
    raise AssertionError(f"{what} did not finish in {timeout} s")


def flow_run_state(flow_run_id: str) -> str | None:
    """The flow run's final state name (None while it is not final)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state.name if state is not None and state.is_final() else None


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("rehearsal")
    torch.manual_seed(0)
    (root / "clip").mkdir()
    clip_file, arch_file = root / "clip/tiny-vit.safetensors", root / "clip/tiny-vit.json"
    save_file({k: v.contiguous() for k, v in create_clip(ARCH).state_dict().items()}, str(clip_file))
    arch_file.write_text(json.dumps(ARCH))
    fake = make_voc(root / "mirror")
    server = serve(root / "mirror")
    try:
        repo = make_project(root, f"http://127.0.0.1:{server.server_address[1]}", fake, clip_file, arch_file)
        # the project's code for every command (cascade-clip, dvc's stages, the worker's flow), its default MLflow store
        env = {k: v for k, v in venv_env({"PYTHONPATH": str(repo), "CASCADE_CLIP_DIR": str(repo),
                                          "CASCADE_CLIP_WORKDIR": str(root / "runs")}).items()
               if k != "MLFLOW_TRACKING_URI"}
        started = time.monotonic()
        queued = run(["cascade-clip", "queue", "table9", "--base", "voc12"], repo, env)
        names = re.findall(r"--name (\S+)", queued)
        run(["dvc", "queue", "start", "--jobs", "1"], repo, env)
        # meanwhile, a scheduled run: the deployment from prefect.yaml, on a process work pool, by a real worker
        run(["prefect", "work-pool", "create", "gpu", "--type", "process", "--overwrite"], repo, env)
        run(["prefect", "--no-prompt", "deploy", "--name", DEPLOYMENT.split("/")[1]], repo, env)
        submitted = run(["prefect", "deployment", "run", DEPLOYMENT, "--param", f"experiment_name={FLOW_EXPERIMENT}",
                         "--param", 'overrides={"evaluate.calibration": 0.0}'], repo, env)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", submitted).group(1)
        worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "gpu", "--work-queue", "gpu-0", "--run-once"],
                                  cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            state = wait(lambda: flow_run_state(flow_run_id), "the flow run")
            status = wait(lambda: (lambda s: s if all(n in s for n in names) and not re.search(r"Queued|Running", s)
                                   else None)(run(["dvc", "queue", "status"], repo, env)), "the queue")
        finally:
            worker.kill()
            worker_output = worker.communicate()[0]
        seconds = time.monotonic() - started
        yield {"root": root, "repo": repo, "env": env, "names": names, "status": status, "state": state,
               "worker_output": worker_output, "fake": fake, "seconds": seconds, "requests": list(MirrorHandler.requests)}
    finally:
        server.shutdown()
        server.server_close()


def test_the_queued_experiments_and_the_scheduled_flow_run_all_succeed_and_leave_no_workspace(rehearsal):
    repo = rehearsal["repo"]
    assert len(rehearsal["names"]) == 2
    assert rehearsal["status"].count("Success") == 2, rehearsal["status"]
    assert rehearsal["state"] == "Completed", rehearsal["worker_output"][-4000:]
    assert not list((repo / ".dvc/tmp/exps").glob("tmp*"))  # the queue's temporary copies are gone
    assert not list((rehearsal["root"] / "runs/cascade-clip-runs").iterdir())  # and the flow run's clone
    # the flow run's experiment came back to the project, its outputs went to the shared DVC remote
    shown = run(["dvc", "exp", "show", "--json"], repo, rehearsal["env"])
    assert FLOW_EXPERIMENT in shown and all(name in shown for name in rehearsal["names"])
    assert list((rehearsal["root"] / "remote").rglob("*")), "nothing was pushed to the DVC remote"
    # the data came from the mirror through the real downloader (both archives, checksums checked)
    assert {Path(p).name for p in rehearsal["requests"]} == {rehearsal["fake"].voc_tar.name, rehearsal["fake"].sbd_tgz.name}
    print(f"rehearsal: {rehearsal['seconds']:.0f} s from queueing to the last run")


def test_compare_lists_the_three_executions_with_hiou_and_their_stage_runs(rehearsal):
    repo, env = rehearsal["repo"], rehearsal["env"]
    printed = run(["cascade-clip", "compare"], repo, env)
    print(printed)
    for name in (*rehearsal["names"], FLOW_EXPERIMENT):
        [row] = [line for line in printed.splitlines() if name in line]
        assert re.search(r"\d+\.\d\d", row), row
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")  # the project's own default store
    experiment = client.get_experiment_by_name("cascade-clip")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = {r.data.tags.get(TAG_DVC_EXP): r for r in runs if TAG_ROLE in r.data.tags}
    assert set(parents) >= {*rehearsal["names"], FLOW_EXPERIMENT}
    for name, parent in parents.items():
        stages = {r.data.tags[TAG_STAGE] for r in runs if r.data.tags.get(TAG_PARENT_RUN) == parent.info.run_id}
        assert "evaluate" in stages, (name, stages)  # each execution's own stage runs, nested under it
        assert "hIoU" in parent.data.metrics
    assert "prepare_data" in {r.data.tags.get(TAG_STAGE) for r in runs}  # the data came through the real downloader


def test_the_registered_best_model_loads_and_predicts_from_the_store(rehearsal):
    repo, env = rehearsal["repo"], rehearsal["env"]
    run(["cascade-clip", "compare", "--register", "rehearsal"], repo, env)
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    version = client.get_model_version_by_alias("rehearsal", "best")
    assert version.source.startswith("runs:/")  # the run's logged artifact, never a workspace path
    run_id, _, path = version.source.removeprefix("runs:/").partition("/")
    stored = Path(urlparse(client.get_run(run_id).info.artifact_uri).path) / path
    assert stored.is_relative_to(repo / "mlartifacts")  # in the project's store, not in a removed workspace
    model_file = rehearsal["root"] / "registered.safetensors"
    original = stored.read_bytes()
    try:  # one bit flipped in the store: refused, by the sha256 recorded when the run logged it
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        refused = subprocess.run(["cascade-clip", "fetch-model", "rehearsal", "--out", str(model_file)], cwd=repo, env=env,
                                 capture_output=True, text=True)
        assert refused.returncode != 0 and "refusing to use it" in refused.stderr and not model_file.exists()
    finally:
        stored.write_bytes(original)
    run(["cascade-clip", "fetch-model", "rehearsal", "--out", str(model_file)], repo, env)
    # the model file refers to its backbone, found in the project's DVC cache (no workspace has it checked out);
    # from Python, anywhere: the run records the project the model was made in
    assert not (repo / "artifacts/backbone").exists()
    model = load_registered_model(client, "rehearsal")
    assert model.backbone_ref is not None and model.model_cfg.image_size == SHRUNK["model"]["image_size"]
    image = rehearsal["root"] / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    out = rehearsal["root"] / "predictions"
    run(["cascade-clip", "predict", str(image), "--classes", "cat,dog,sofa", "--model", str(model_file), "--out", str(out),
         "--device", "cpu"], repo, env)
    label = np.asarray(Image.open(out / "photo_label.png"))
    assert label.shape == (40, 56) and set(np.unique(label)) <= {0, 1, 2}
