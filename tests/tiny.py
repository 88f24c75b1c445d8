"""Parameter overrides that shrink every stage to seconds, for end-to-end tests of the real pipeline."""

import yaml

from pipeline.config import deep_merge, render_params_yaml

TINY_OVERRIDES = {
    "dataset": {"demo": {"n_train": 16, "n_val": 6, "image_size": 48, "workers": 1}},
}


def tiny_params_yaml(extra: dict | None = None) -> str:
    params = yaml.safe_load(render_params_yaml())
    params = deep_merge(params, TINY_OVERRIDES)
    if extra:
        params = deep_merge(params, extra)
    return yaml.safe_dump(params, sort_keys=False)
