"""Safe extraction of the dataset archives (.tar, .tgz / .tar.gz, .zip).

Every member is checked before a byte of it is written: a member whose path would land outside
the target folder (`../`, an absolute path, a drive letter), any symbolic or hard link, and any
device file or FIFO is refused. All refused members are listed in one `UnsafeArchiveError`.
Extraction goes into a temporary sibling folder that becomes the target only when the whole
archive was read without a problem, so a refused or truncated archive leaves nothing behind.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline.errors import CascadeError
from pipeline.io import atomic_dir

ARCHIVE_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".zip")
_CHUNK = 1 << 20


class ArchiveError(CascadeError):
    """An archive that cannot be read (truncated, corrupt or of an unknown type)."""


class UnsafeArchiveError(ArchiveError):
    """An archive with members that would escape the target folder, links or device files."""


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: str | Path) -> str:
    """The archive's name without its archive suffix (`benchmark.tgz` -> `benchmark`)."""
    name = Path(path).name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def member_problem(name: str) -> str | None:
    """Why a member path is unsafe (None when it stays inside the target folder)."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if "\\" in name:
        return "backslash in path (Windows separator)"
    parts = PurePosixPath(name).parts
    depth = 0
    for part in parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return "path leaves the target folder ('..')"
        elif part not in (".", ""):
            depth += 1
    return None


def _target(dest: Path, name: str) -> Path:
    return dest.joinpath(*(p for p in PurePosixPath(name).parts if p not in (".", "")))


def extract(archive: str | Path, dest: str | Path, *, progress: bool = True) -> Path:
    """Extract `archive` into the folder `dest` (created atomically; replaced if it exists)."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found")
    lower = archive.name.lower()
    with atomic_dir(dest) as tmp:
        if lower.endswith(".zip"):
            _extract_zip(archive, tmp, progress)
        elif lower.endswith((".tar", ".tgz", ".tar.gz")):
            _extract_tar(archive, tmp, progress)
        else:
            raise ArchiveError(f"{archive}: unknown archive type; expected one of {', '.join(ARCHIVE_SUFFIXES)}")
    return dest


def _refuse(archive: Path, refused: list[str]) -> UnsafeArchiveError:
    shown = "\n".join(f"  - {r}" for r in refused[:50])
    more = f"\n  ... and {len(refused) - 50} more" if len(refused) > 50 else ""
    return UnsafeArchiveError(
        f"{archive}: refused to extract {len(refused)} unsafe member(s):\n{shown}{more}\n"
        "Dataset archives contain only plain files and folders; this one is damaged or not the official "
        "file. Delete it and download it again from the dataset's official site."
    )


class _Progress:
    """A read-only file wrapper that advances a byte progress bar (for streamed tar archives)."""

    def __init__(self, handle, bar: tqdm):
        self.handle, self.bar = handle, bar

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.bar.update(len(data))
        return data


def _extract_tar(archive: Path, dest: Path, progress: bool) -> None:
    refused: list[str] = []
    size = archive.stat().st_size
    with open(archive, "rb") as raw, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=f"extracting {archive.name}", disable=not progress) as bar:
        try:
            # streamed ("r|*"): one sequential pass, also over gzip, which has no random access
            with tarfile.open(fileobj=_Progress(raw, bar), mode="r|*") as tar:
                for member in tar:
                    problem = member_problem(member.name)
                    if problem is None:
                        problem = _tar_type_problem(member)
                    if problem:
                        refused.append(f"{member.name!r}: {problem}")
                        continue
                    target = _target(dest, member.name)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    with open(target, "wb") as out:
                        shutil.copyfileobj(source, out, _CHUNK)
                    os.chmod(target, 0o644)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as exc:
            raise ArchiveError(f"{archive}: cannot read the archive ({exc}); it is truncated or corrupt: "
                               "delete it and download it again") from None
    if refused:
        raise _refuse(archive, refused)


def _tar_type_problem(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return f"symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    if not (member.isfile() or member.isdir()):
        return f"unsupported member type {member.type!r}"
    return None


def _zip_type_problem(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:  # made on Unix: the high bits hold st_mode
        if stat.S_ISLNK(mode):
            return "symbolic link"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return "device file"
        if stat.S_ISFIFO(mode):
            return "FIFO"
        if stat.S_ISSOCK(mode):
            return "socket"
    return None


def _extract_zip(archive: Path, dest: Path, progress: bool) -> None:
    try:
        handle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{archive}: not a readable zip archive ({exc}); delete it and download it again") from None
    with handle:
        infos = handle.infolist()
        refused = []
        for info in infos:
            problem = member_problem(info.filename) or _zip_type_problem(info)
            if problem:
                refused.append(f"{info.filename!r}: {problem}")
        if refused:
            raise _refuse(archive, refused)
        total = sum(i.file_size for i in infos)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"extracting {archive.name}", disable=not progress) as bar:
            for info in infos:
                target = _target(dest, info.filename)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with handle.open(info) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, _CHUNK)
                except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
                    raise ArchiveError(f"{archive}: member {info.filename!r} cannot be read ({exc}); the archive "
                                       "is corrupt: delete it and download it again") from None
                bar.update(info.file_size)

