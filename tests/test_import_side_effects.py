"""Importing the library changes nothing in the process: no environment variables, no matplotlib
backend, no logging set-up, no exit. Processes are configured by their entry points (the stages,
the `cascade-clip` command), not by an import."""

import json
import os
import subprocess
import sys

from tests.project import REPO

# The third-party packages the library uses are imported first, so what is compared is what
# importing the library adds. Every module of the `pipeline` package is then imported.
PROBE = r"""
import json, logging, os, pkgutil, importlib
import numpy, torch, open_clip, matplotlib, matplotlib.pyplot, PIL.Image, skimage, safetensors, pydantic, yaml, tqdm

def state():
    return {
        "environ": dict(os.environ),
        "backend": repr(dict.__getitem__(matplotlib.rcParams, "backend")),
        "root_handlers": len(logging.getLogger().handlers),
    }

before = state()
import pipeline
names = [m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"before": before, "after": state(), "modules": len(names)}))
"""

CHOSEN_BY_ENTRY_POINTS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MPLBACKEND")


def test_importing_every_library_module_leaves_the_process_as_it_was():
    env = {k: v for k, v in os.environ.items() if k not in CHOSEN_BY_ENTRY_POINTS}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # no SystemExit, no error
    result = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = result["before"], result["after"]
    added = {k: v for k, v in after["environ"].items() if before["environ"].get(k) != v}
    removed = sorted(set(before["environ"]) - set(after["environ"]))
    assert not added and not removed, f"importing pipeline set {added} and removed {removed}"
    assert after["backend"] == before["backend"], "importing pipeline chose a matplotlib backend"
    assert after["root_handlers"] == before["root_handlers"], "importing pipeline configured logging"
    assert result["modules"] > 30  # the walk found the library's modules
