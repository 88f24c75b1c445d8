"""Atomic outputs: everything is written aside, then renamed into place only on success.

A stage killed at any point leaves either the previous complete output or none at the output
path, never a half-written one; leftovers carry a `.tmp-` / `.old-` marker and are swept by the
next run (`sweep_stale`). Running out of disk space while writing raises `DiskFullError`, which
names the output and the fix.

Durability: what is written aside is fsynced before the rename (a file, or every file and folder
of a folder), and the parent folder after it, so after a power cut the output path holds the old
or the new complete version, never a renamed folder of empty files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import CascadeError

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
# seconds an atomic folder, complete but not yet renamed, is held in place: a known point at which
# the fault-injection tests kill a stage (tests/test_fault_injection.py). Unset: no pause.
PAUSE_BEFORE_RENAME_ENV = "CASCADE_CLIP_PAUSE_BEFORE_RENAME"
_FSYNC_THREADS = 8  # files fsynced at once: fsync waits on the disk, so a prepared dataset's many files overlap


class DiskFullError(CascadeError, OSError):
    """No space left on the device while writing an output; what was at the output path is unchanged."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _raise_if_disk_full(exc: BaseException, target: Path) -> None:
    """Turn an out-of-space OSError raised while writing `target` into a `DiskFullError` naming it."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        raise DiskFullError(
            errno.ENOSPC,
            f"{target}: disk full (no space left on device) while writing this output; its previous version, if any, "
            f"is unchanged. Free space on the disk holding {target.parent} and re-run.",
        ) from exc


def sweep_stale(target: Path) -> list[Path]:
    """Remove leftovers of killed writes of `target` (hidden `.NAME.tmp-*` / `.NAME.old-*` siblings)."""
    target = Path(target)
    removed = []
    if not target.parent.exists():
        return removed
    for mark in (TMP_MARK, OLD_MARK):
        for stale in target.parent.glob(f".{target.name}{mark}*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder itself: makes the entries created, renamed or removed in it durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every regular file under `folder`, then every folder in it (deepest first, `folder` last),
    so its content is on disk before a rename publishes it. Symbolic links are not followed."""
    folders, files = [], []
    for top, _, names in os.walk(folder):
        folders.append(top)
        files += [p for p in (os.path.join(top, n) for n in names) if stat.S_ISREG(os.lstat(p).st_mode)]
    if len(files) > 1:
        with ThreadPoolExecutor(min(_FSYNC_THREADS, len(files))) as pool:
            list(pool.map(_fsync_file, files))
    elif files:
        _fsync_file(files[0])
    for top in reversed(folders):
        fsync_dir(top)


def replace_path(src: Path, target: Path) -> None:
    """Move `src` to `target`, replacing what is there; a file is replaced atomically, a folder
    is first moved aside so `target` is always either the old or the new complete version.
    The parent folder is fsynced after the rename, so the rename survives a power cut."""
    src, target = Path(src), Path(target)
    if src.is_dir() and target.exists():
        old = target.with_name(f".{target.name}{OLD_MARK}{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(src, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)
        fsync_dir(target.parent)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            break


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it becomes `target` (its files and folders
    fsynced first), on error it is removed (with any parent folders this call created), so a failure
    writes nothing at all."""
    target = Path(target)
    created = _make_parents(target.parent)
    sweep_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(created)
        _raise_if_disk_full(exc, target)
        raise
    pause = float(os.environ.get(PAUSE_BEFORE_RENAME_ENV) or 0)
    if pause > 0:
        time.sleep(pause)
    replace_path(tmp, target)


@contextmanager
def atomic_file(target: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling for writing; it replaces `target` (fsynced, and its folder after the
    rename) only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(exc, target)
        raise
    replace_path(tmp, target)


def write_safetensors(tensors: Mapping[str, Any], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors' save_file, atomic and byte-stable: the same tensors and metadata give the same bytes.

    safetensors writes the header's metadata in hash order, which differs from one call to the
    next, so identical models gave files with different bytes and DVC hashes. The header is
    written again with the metadata sorted by key and the tensors in file order.
    """
    from safetensors.torch import save

    blob = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} if "__metadata__" in header else {}
    ordered |= dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"]))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with atomic_file(path) as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        handle.write(memoryview(blob)[8 + size :])
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in chunks (hex)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
