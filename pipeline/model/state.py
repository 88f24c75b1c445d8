"""Strict state-dict checking shared by every loader in the package.

Every key and shape is compared; all problems are collected and raised together in one
`StateDictError`, so a user sees the whole mismatch at once instead of the first key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from pipeline.errors import CascadeError

_MAX_LISTED = 40  # keys listed per problem kind before the message says "... and N more"


class StateDictError(CascadeError, ValueError):
    """A state dict does not match the model it is loaded into; the message lists every problem."""


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    given: Mapping[str, torch.Tensor],
    *,
    source: str,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> None:
    """Raise `StateDictError` unless `given` has exactly the keys and shapes of `expected`.

    Args:
        expected: key -> shape the model needs.
        given: key -> tensor offered (a checkpoint's state dict).
        source: what `given` came from (a file name), named in the message.
        allow_missing: keys of `expected` that may be absent from `given`.
        allow_unexpected: keys of `given` that may be absent from `expected` (they are ignored).
    """
    allow_missing, allow_unexpected = set(allow_missing), set(allow_unexpected)
    missing = [k for k in expected if k not in given and k not in allow_missing]
    unexpected = [k for k in given if k not in expected and k not in allow_unexpected]
    mismatched = [
        f"{k}: checkpoint {list(given[k].shape)} vs model {list(expected[k])}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            shown = "\n".join(f"    {k}" for k in keys[:_MAX_LISTED])
            more = f"\n    ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
            parts.append(f"  {title} ({len(keys)}):\n{shown}{more}")
    raise StateDictError(f"{source}: state dict does not match the model\n" + "\n".join(parts))


def load_state_strict(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    allow_missing: Iterable[str] = (),
) -> None:
    """Check `state` against `module` with `check_state_dict`, then copy it in."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state, source=source, allow_missing=allow_missing)
    module.load_state_dict(dict(state), strict=False)
