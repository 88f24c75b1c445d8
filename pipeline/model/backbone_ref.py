"""A model file's reference to its frozen CLIP backbone file, and where to find that file again.

A trained model shares most of its tensors with the frozen CLIP it was built on (about 150M of
176M parameters with ViT-B/16). Model files written by the stages keep only the other tensors plus
a `BackboneRef`: the backbone file's path as the stage saw it, its sha256 (checked before use), its
md5 (the DVC cache names files by md5, so a backbone that is cached but not checked out is found
too) and a line saying what the backbone is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import CascadeError
from pipeline.io import sha256_file

BACKBONE_FILE = "clip.safetensors"  # the file a backbone folder (stage backbone's output) holds


class BackboneNotFound(CascadeError, FileNotFoundError):
    """A model file's backbone is at none of the places looked at (or a file there has other contents)."""


@dataclass(frozen=True)
class BackboneRef:
    file: str
    """the backbone file's path when the model was written (relative to the project root)"""
    sha256: str
    """sha256 of the file; a candidate with another one is never used"""
    md5: str
    """md5 of the file: its name in a DVC cache (files/md5/<2>/<30>)"""
    size_bytes: int
    """size of the file in bytes"""
    source: str = ""
    """what the backbone is (e.g. `openai ViT-B-16`, `toy`), for error messages"""

    @classmethod
    def of_file(cls, path: str | Path, *, recorded_as: str | Path | None = None, source: str = "") -> BackboneRef:
        """The reference of an existing backbone file; `recorded_as` is the path to record (default `path`)."""
        path = Path(path)
        md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
        with open(path, "rb") as handle:  # one read for both digests (a ViT-L/14 file is 1.7 GB)
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                md5.update(chunk)
                sha256.update(chunk)
        return cls(file=str(recorded_as or path), sha256=sha256.hexdigest(), md5=md5.hexdigest(),
                   size_bytes=path.stat().st_size, source=source)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str) -> BackboneRef:
        try:
            data = json.loads(text)
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise CascadeError(f"{source}: its backbone reference is not valid ({exc}); write the file again with "
                               "this version (`dvc repro`)") from None


def _projects(model_file: Path) -> list[Path]:
    """Folders a relative backbone path may be relative to: the working directory, then the
    folders above the model file that hold a dvc.yaml (its project)."""
    found = [Path.cwd()]
    found += [folder for folder in model_file.resolve().parents if (folder / "dvc.yaml").is_file()]
    return list(dict.fromkeys(found))


def candidates(ref: BackboneRef, model_file: Path, given: str | Path | None = None) -> list[Path]:
    """Where the backbone of `ref` is looked for, in order: `given` (a backbone file; or a backbone folder or
    project folder), else the recorded path in the working directory's and the model file's project, then
    those projects' DVC caches."""
    given = None if given is None else Path(given)
    if given is not None and not given.is_dir():
        return [given]
    projects = [given] if given is not None else _projects(model_file)
    recorded = Path(ref.file)
    places = [given / BACKBONE_FILE] if given is not None else []
    places += [recorded] if recorded.is_absolute() else [project / recorded for project in projects]
    dvc_name = Path(".dvc", "cache", "files", "md5", ref.md5[:2], ref.md5[2:])
    places += [project / dvc_name for project in projects]
    return list(dict.fromkeys(places))


def resolve_backbone(ref: BackboneRef, model_file: str | Path, given: str | Path | None = None) -> Path:
    """The backbone file of `ref`: the first candidate with its sha256, else `BackboneNotFound`
    naming the file, every place looked at and how to get it."""
    model_file = Path(model_file)
    tried = []
    for place in candidates(ref, model_file, given):
        if not place.is_file():
            tried.append(f"{place} (missing)")
        elif place.stat().st_size != ref.size_bytes or sha256_file(place) != ref.sha256:
            tried.append(f"{place} (another file: its sha256 differs)")
        else:
            return place
    what = f"{ref.file} ({ref.source + ', ' if ref.source else ''}sha256 {ref.sha256[:12]}...)"
    raise BackboneNotFound(
        f"{model_file}: the model needs its frozen CLIP backbone {what}, which was not found; looked at:\n    "
        + "\n    ".join(tried)
        + "\n  get it in the project that trained the model with `dvc pull artifacts/backbone` (from its DVC remote) or "
        "`dvc repro backbone` (the same clip params give the same file), or give its path: "
        "`cascade-clip predict --backbone PATH`, `pipeline.model.load(..., backbone=PATH)` (the file, its folder or "
        "the project folder)"
    )
