"""Model files: one .safetensors with the model's tensors plus the model and arch configs as metadata.

`save`/`load` hold the whole model (load rebuilds it from the metadata and checks every key and
shape). A model built on a backbone file (`model.backbone_ref` set, as the training stages do) is
written without the frozen CLIP tensors it shares with that file, plus a reference to the file
(pipeline.model.backbone_ref); `load` finds the file again and checks its sha256.
`save_trainable`/`load_trainable` hold only the trainable tensors (training checkpoints).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.config import ModelConfig
from pipeline.io import write_safetensors
from pipeline.model.backbone_ref import BackboneRef, resolve_backbone
from pipeline.model.build import build_model
from pipeline.model.cascade import CascadeCLIP
from pipeline.model.clip import ArchError, check_arch
from pipeline.model.state import StateDictError, check_state_dict

FORMAT = "cascade-clip-model/1"  # metadata "format" of a full model file
REF_FORMAT = "cascade-clip-model+backbone/1"  # ... of a model file that refers to its backbone file for the CLIP tensors
TRAINABLE_FORMAT = "cascade-clip-trainable/1"  # metadata "format" of a trainable-tensors file


def _metadata(model_cfg: ModelConfig, arch: Mapping, fmt: str, extra: Mapping | None = None) -> dict[str, str]:
    meta = {"format": fmt, "model_config": model_cfg.model_dump_json(), "arch": json.dumps(arch, sort_keys=True)}
    if extra:
        meta["extra"] = json.dumps(extra, sort_keys=True, default=str)
    return meta


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_model_file(
    state: Mapping[str, torch.Tensor], model_cfg: ModelConfig, arch: Mapping, path: str | Path, extra: Mapping | None = None
) -> Path:
    """Write a full model file from a state dict (used by `save` and the release importer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(_tensors(state), path, _metadata(model_cfg, arch, FORMAT, extra))
    return path


def referenced_keys(model: CascadeCLIP) -> set[str]:
    """The state-dict keys a model file with a backbone reference leaves out: the frozen tensors that are the
    backbone checkpoint's own (trainable ones are always written)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return set(model.clip_keys) - trainable


def save(model: CascadeCLIP, path: str | Path, extra: Mapping | None = None) -> Path:
    """Write the model's state dict and its configs to one .safetensors file: every tensor, or, when
    `model.backbone_ref` is set, every tensor but the frozen CLIP ones plus the reference.

    `extra` is JSON-ready information for users of the file (pixel normalisation, classes it was
    trained on, inference settings); read it back with `model_extra(path)`.
    """
    if model.backbone_ref is None:
        return write_model_file(model.state_dict(), model.model_cfg, model.arch, path, extra)
    left_out = referenced_keys(model)
    state = {k: v for k, v in model.state_dict().items() if k not in left_out}
    meta = _metadata(model.model_cfg, model.arch, REF_FORMAT, extra)
    meta["backbone"] = model.backbone_ref.to_json()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(_tensors(state), path, meta)
    return path


def model_extra(path: str | Path) -> dict:
    """The `extra` information saved with a model file ({} when there is none)."""
    return json.loads(read_metadata(path).get("extra", "{}"))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a model file (format, model_config JSON, arch JSON)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load(path: str | Path, map_location: str | torch.device = "cpu", *, backbone: str | Path | None = None) -> CascadeCLIP:
    """Rebuild a model saved with `save`: its configs validated (the arch by `check_arch`) before anything
    is built, then every key and shape checked. A file that refers to its backbone gets it from
    `backbone` (a file or a backbone folder) when given, else from where `resolve_backbone` finds it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    meta = read_metadata(path)
    if meta.get("format") not in (FORMAT, REF_FORMAT):
        raise ValueError(f"{path}: not a Cascade-CLIP model file (format {meta.get('format')!r}, expected {FORMAT!r} "
                         f"or {REF_FORMAT!r})")
    try:
        model_cfg = ModelConfig.model_validate_json(meta.get("model_config", ""))
        arch = json.loads(meta.get("arch", ""))
    except ValueError as exc:  # pydantic's ValidationError and json's JSONDecodeError are ValueErrors
        raise ArchError(f"{path}: the model or arch config in its metadata is not valid ({exc}); write the file "
                        "again with this version (`dvc repro`, or `cascade-clip import-checkpoint`)") from None
    arch = check_arch(arch, source=str(path))
    ref = None
    if meta["format"] == REF_FORMAT:
        ref = BackboneRef.from_json(meta.get("backbone", ""), source=str(path))
        model = build_model(model_cfg, arch, load_file(str(resolve_backbone(ref, path, backbone)), device="cpu"))
        left_out = referenced_keys(model)
    else:
        model, left_out = build_model(model_cfg, arch), set()
    state = load_file(str(path), device="cpu")
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in left_out}
    try:
        check_state_dict(expected, state, source=str(path))
    except StateDictError as exc:
        raise StateDictError(
            f"{exc}\n  the tensors do not fit the model config stored in the same file (another code version, or an "
            "edited file); write the file again with this version (`dvc repro`, or `cascade-clip import-checkpoint`)"
        ) from None
    model.load_state_dict(state, strict=not left_out)
    model.backbone_ref = ref
    return model.to(map_location)


def trainable_state(model: CascadeCLIP) -> dict[str, torch.Tensor]:
    """The tensors of the parameters that require grad, by state-dict key."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def save_trainable(model: CascadeCLIP, path: str | Path) -> Path:
    """Write only the trainable tensors (prompts, head, trainable taps) with the model config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(_tensors(trainable_state(model)), path, _metadata(model.model_cfg, model.arch, TRAINABLE_FORMAT))
    return path


def _differences(meta: Mapping[str, str], model: CascadeCLIP) -> str:
    """The model-config fields (and whether the CLIP architecture) differ between a file's metadata and `model`."""
    saved, current = ModelConfig.model_validate_json(meta["model_config"]).model_dump(), model.model_cfg.model_dump()
    changed = [f"model.{k}: file {saved[k]!r} vs model {current[k]!r}" for k in saved if saved[k] != current[k]]
    if meta["arch"] != json.dumps(model.arch, sort_keys=True):
        changed.append("CLIP architecture")
    return ", ".join(changed)


def load_trainable(model: CascadeCLIP, path: str | Path) -> None:
    """Copy trainable tensors saved with `save_trainable` into `model` (exact keys and shapes)."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != TRAINABLE_FORMAT:
        raise ValueError(f"{path}: not a trainable-tensors file (format {meta.get('format')!r})")
    state = load_file(str(path), device="cpu")
    expected = {k: v.shape for k, v in trainable_state(model).items()}
    try:
        check_state_dict(expected, state, source=str(path))
    except StateDictError as exc:
        changed = _differences(meta, model)
        origin = f"the file was saved from another model ({changed})" if changed else "the file was saved by another code version"
        raise StateDictError(
            f"{exc}\n  {origin}; load it into a model built like the one that saved it, or train again with the current params"
        ) from None
    model.load_state_dict(state, strict=False)
