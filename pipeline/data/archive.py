"""Safe extraction of the dataset archives (.tar, .tgz / .tar.gz, .zip).

Every member is checked before a byte of the archive is written: a member whose path would land
outside the target folder (`../`, an absolute path, a drive letter), any symbolic or hard link, and
any device file or FIFO is refused. All refused members are listed in one `UnsafeArchiveError`.
A tar member passes the standard library's `filter="data"` (`tarfile.data_filter`, PEP 706) first,
in both passes, and the rules above on top: they are stricter (the filter lets links inside the
target and absolute paths, stripped of their `/`, through).
Decompression bombs are refused too (`ArchiveLimitError`): the archive's own index (a zip's central
directory; a tar's member headers, read in a first pass that writes nothing) must hold at most
`max_members` members of at most `max_bytes` bytes in all, and no member may yield more bytes than
its header declares. Extraction goes into a temporary sibling folder that becomes the target only
when the whole archive was read without a problem, so a refused or truncated archive leaves
nothing behind.
"""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline.errors import CascadeError
from pipeline.io import atomic_dir

ARCHIVE_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".zip")
MAX_BYTES = 64 << 30  # default limit on an archive's uncompressed size (COCO's train2017.zip: about 19 GB)
MAX_MEMBERS = 2_000_000  # default limit on its members, files and folders (train2017.zip: about 118k)
_CHUNK = 1 << 20
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


class ArchiveError(CascadeError):
    """An archive that cannot be read (truncated, corrupt or of an unknown type)."""


class UnsafeArchiveError(ArchiveError):
    """An archive with members that would escape the target folder, links or device files."""


class ArchiveLimitError(ArchiveError):
    """An archive over the extraction limits (uncompressed size, member count): a decompression bomb."""


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


@dataclass(frozen=True)
class _Limits:
    archive: Path
    max_bytes: int  # uncompressed bytes of all members together
    max_members: int

    def check(self, members: int, total: int, *, partial: bool) -> None:
        """Raise ArchiveLimitError if `members` members of `total` bytes break a limit (`partial`: counting
        stopped at the breach, so the archive holds at least that much)."""
        more = " or more" if partial else ""
        if members > self.max_members:
            raise self._error(f"{members:,}{more} members", self.max_members, "members", "max_members")
        if total > self.max_bytes:
            raise self._error(f"{total:,}{more} bytes uncompressed", self.max_bytes, "bytes", "max_bytes")

    def _error(self, figure: str, limit: int, unit: str, key: str) -> ArchiveLimitError:
        return ArchiveLimitError(
            f"{self.archive}: {figure}, more than the limit of {limit:,} {unit}; this is not the official dataset "
            "archive (it is damaged, or a decompression bomb): delete it and download it again. If it is genuine, "
            f"extract it with a larger limit (pipeline.data.archive.extract(..., {key}=...))."
        )


def extract(archive: str | Path, dest: str | Path, *, progress: bool = True, max_bytes: int = MAX_BYTES,
            max_members: int = MAX_MEMBERS) -> Path:
    """Extract `archive` into the folder `dest` (created atomically; replaced if it exists), refusing an
    archive of more than `max_members` members or `max_bytes` uncompressed bytes before writing anything."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found")
    limits = _Limits(archive, max_bytes, max_members)
    lower = archive.name.lower()
    with atomic_dir(dest) as tmp:
        if lower.endswith(".zip"):
            _extract_zip(archive, tmp, limits, progress)
        elif lower.endswith((".tar", ".tgz", ".tar.gz")):
            _extract_tar(archive, tmp, limits, progress)
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


def _copy_member(source, target: Path, declared: int, archive: Path, name: str) -> None:
    """Write a member's bytes to `target`, refusing any byte past the `declared` size (a lying header)."""
    written = 0
    with open(target, "wb") as out:
        while chunk := source.read(min(_CHUNK, declared - written + 1)):
            written += len(chunk)
            if written > declared:
                raise ArchiveLimitError(
                    f"{archive}: member {name!r} holds more than the {declared:,} bytes its header declares; the "
                    "archive is damaged or a decompression bomb: delete it and download it again"
                )
            out.write(chunk)


class _Progress:
    """A read-only file wrapper that moves a byte progress bar to the position read so far."""

    def __init__(self, handle, bar: tqdm):
        self.handle, self.bar = handle, bar

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.bar.update(max(self.handle.tell() - self.bar.n, 0))
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()


def _tar_problem(member: tarfile.TarInfo, dest: Path) -> str | None:
    """Why a tar member is unsafe: tarfile's data filter's reason, then ours (None when both accept it)."""
    problems = []
    try:
        tarfile.data_filter(member, str(dest))
    except tarfile.FilterError as exc:
        problems.append(f"refused by tarfile's data filter ({type(exc).__name__}: {exc})")
    if own := member_problem(member.name) or _tar_type_problem(member):
        problems.append(own)
    return "; ".join(problems) or None


def _bar(archive: Path, progress: bool, verb: str) -> tqdm:
    return tqdm(total=archive.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"{verb} {archive.name}", disable=not progress)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members one at a time, without tarfile's list of every header seen (a bomb may hold millions)."""
    while (member := tar.next()) is not None:
        yield member
        tar.members.clear()


def _check_tar(archive: Path, dest: Path, limits: _Limits, progress: bool) -> None:
    """The first pass, which writes nothing: every member header against the limits and the safety rules."""
    refused: list[str] = []
    members = total = 0
    with open(archive, "rb") as raw, _bar(archive, progress, "checking") as bar, \
            tarfile.open(fileobj=_Progress(raw, bar), mode="r:*") as tar:  # seeks past the members' data
        for member in _members(tar):
            members, total = members + 1, total + (member.size if member.isfile() else 0)
            limits.check(members, total, partial=True)
            if problem := _tar_problem(member, dest):
                refused.append(f"{member.name!r}: {problem}")
    if refused:
        raise _refuse(archive, refused)


def _extract_tar(archive: Path, dest: Path, limits: _Limits, progress: bool) -> None:
    try:
        _check_tar(archive, dest, limits, progress)
        members = total = 0
        # streamed ("r|*"): one sequential pass, also over gzip, which has no random access
        with open(archive, "rb") as raw, _bar(archive, progress, "extracting") as bar, \
                tarfile.open(fileobj=_Progress(raw, bar), mode="r|*") as tar:
            for member in _members(tar):
                members, total = members + 1, total + (member.size if member.isfile() else 0)
                limits.check(members, total, partial=True)  # the file may have changed since the first pass
                if problem := _tar_problem(member, dest):
                    raise _refuse(archive, [f"{member.name!r}: {problem}"])
                target = _target(dest, member.name)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_member(tar.extractfile(member), target, member.size, archive, member.name)
                os.chmod(target, 0o644)
    except _TAR_ERRORS as exc:
        raise ArchiveError(f"{archive}: cannot read the archive ({exc}); it is truncated or corrupt: "
                           "delete it and download it again") from None


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


def _extract_zip(archive: Path, dest: Path, limits: _Limits, progress: bool) -> None:
    try:
        handle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{archive}: not a readable zip archive ({exc}); delete it and download it again") from None
    with handle:
        infos = handle.infolist()
        total = sum(i.file_size for i in infos)
        limits.check(len(infos), total, partial=False)
        refused = []
        for info in infos:
            problem = member_problem(info.filename) or _zip_type_problem(info)
            if problem:
                refused.append(f"{info.filename!r}: {problem}")
        if refused:
            raise _refuse(archive, refused)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"extracting {archive.name}", disable=not progress) as bar:
            for info in infos:
                target = _target(dest, info.filename)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with handle.open(info) as source:
                        _copy_member(source, target, info.file_size, archive, info.filename)
                except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
                    raise ArchiveError(f"{archive}: member {info.filename!r} cannot be read ({exc}); the archive "
                                       "is corrupt: delete it and download it again") from None
                bar.update(info.file_size)
