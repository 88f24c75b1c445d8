"""Getting a real dataset's source files: from `dataset.source_dir`, the cache, or the internet.

Each catalog dataset lists its sources (catalog.yaml, `sources:`): the official file name and URL,
the known size and checksums, the splits that need it, and where its content sits once extracted.
`locate_sources` finds, for every source a set of splits needs, the folder the converters read:

1. an already extracted copy under `dataset.source_dir` (no download, no extraction);
2. the archive itself under `dataset.source_dir` (checked, then extracted into the cache);
3. a copy extracted into `dataset.cache_dir` by an earlier run;
4. a download into `dataset.cache_dir` (unless `dataset.download` is false).

Downloads are resumable: bytes go to `<file>.part`, and a later try asks the server for the rest
with an HTTP Range header. Transient network errors are retried with exponential back-off; the
finished file's size and checksums are verified before it is used.

A source without a published checksum (COCO-Stuff's stuffthingmaps) is pinned at its first use,
downloaded or found in dataset.source_dir: its size and sha256 are written to
`<cache>/<dataset>/downloads/<file>.pin.json`, and every later use must have that sha256 (trust on
first use; deleting the pin file pins the next copy used). Plain Python on purpose: the
prepare_data stage may add a Prefect task retry around it, but nothing here imports Prefect.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.config import DatasetConfig
from pipeline.data.archive import archive_stem, extract, is_archive
from pipeline.data.catalog import DatasetEntry
from pipeline.errors import CascadeError
from pipeline.io import write_json

log = logging.getLogger("cascade_clip.data")

CHECKSUM_ALGORITHMS = ("md5", "sha1", "sha256")
PART_SUFFIX = ".part"
CORRUPT_SUFFIX = ".corrupt"  # beside the download: a finished file that failed its checks (kept for a look)
PIN_SUFFIX = ".pin.json"  # beside the cached download: size and sha256 of a source without published checksums
_CHUNK = 1 << 20
_MAX_BACKOFF = 300.0  # seconds: the longest wait between two tries
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
# name-resolution failures that say "no such host" (not "try again"): offline, so fail at once
_UNKNOWN_HOST = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}


class DownloadError(CascadeError):
    """A file that could not be downloaded (a permanent error, e.g. HTTP 404).

    The message is `failure` (what went wrong), then `advice` (what to do: for datasets, where to put
    the file by hand). Callers with advice of their own (pipeline.weights) show `failure` alone.
    """

    def __init__(self, failure: str, advice: str = ""):
        super().__init__(f"{failure}. {advice}" if advice else failure)
        self.failure, self.advice = failure, advice


class TransientDownloadError(DownloadError):
    """Network errors that outlasted every retry; trying again later may succeed."""

    transient = True


class ChecksumError(DownloadError):
    """A file whose size or checksum differs from the catalog's."""


class MissingSourceError(CascadeError):
    """Source files that are neither in dataset.source_dir nor in the cache, with downloads off."""


@dataclass(frozen=True)
class Source:
    """One official source file of a dataset (an entry of `sources:` in catalog.yaml)."""

    key: str  # name of the source within its dataset (voc2012, sbd, ...)
    file: str  # official file name
    url: str  # official download URL
    size: int | None  # bytes; None where not confirmed
    checksums: dict[str, str]  # algorithm (md5, sha1, sha256) -> hex digest; empty where not confirmed
    splits: tuple[str, ...]  # prepared splits that need this source
    content: str  # folder inside the extracted archive that the converter reads ("" = its top)
    markers: tuple[str, ...]  # glob patterns, relative to `content`, that must all match
    dirs: tuple[str, ...] = field(default_factory=tuple)  # other folder names users extract it to

    @property
    def archive(self) -> bool:
        return is_archive(self.file)

    @property
    def stem(self) -> str:
        return archive_stem(self.file)


def dataset_sources(entry: DatasetEntry, splits: Iterable[str] | None = None, mirrors: Mapping | None = None) -> list[Source]:
    """The catalog's sources of `entry` that any of `splits` needs (all of them when None). A source in
    `mirrors` (params dataset.mirrors: key -> url, md5/sha256, size) comes from the mirror's URL and is
    checked against the mirror's checksum instead of the catalog's."""
    wanted = set(splits) if splits is not None else None
    sources = []
    for key, spec in (entry.extra.get("sources") or {}).items():
        mirror = (mirrors or {}).get(key)
        if mirror is not None:
            spec = {**{k: v for k, v in spec.items() if k not in ("size", *CHECKSUM_ALGORITHMS)},
                    **{k: getattr(mirror, k) for k in ("url", "size", "md5", "sha256")}}
        source = Source(
            key=key,
            file=spec["file"],
            url=spec["url"],
            size=spec.get("size"),
            checksums={a: str(spec[a]).lower() for a in CHECKSUM_ALGORITHMS if spec.get(a)},
            splits=tuple(spec["splits"]),
            content=spec.get("content", ""),
            markers=tuple(spec["markers"]),
            dirs=tuple(spec.get("dirs", ())),
        )
        if wanted is None or wanted & set(source.splits):
            sources.append(source)
    return sources


# --------------------------------------------------------------------------------------------
# checking files
# --------------------------------------------------------------------------------------------
def file_checksums(path: Path, algorithms: Iterable[str], *, progress: bool = False) -> dict[str, str]:
    """Hex digests of `path` for each algorithm, in one read of the file."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    if not hashers:
        return {}
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=f"verifying {path.name}", disable=not progress) as bar:
        while chunk := handle.read(4 * _CHUNK):
            for hasher in hashers.values():
                hasher.update(chunk)
            bar.update(len(chunk))
    return {a: h.hexdigest() for a, h in hashers.items()}


def verify_file(path: Path, size: int | None, checksums: dict[str, str], *, fix: str,
                progress: bool = False) -> dict[str, str]:
    """The file's `checksums` algorithms' digests, as `file_checksums`; ChecksumError (naming the file, the
    expected and the actual value, and `fix`) when one of them or its size differs."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{path}: size mismatch: expected {size} bytes, found {actual_size}", fix)
    actual = file_checksums(path, checksums, progress=progress)
    for algorithm, expected in checksums.items():
        if actual[algorithm] != expected:
            raise ChecksumError(f"{path}: {algorithm} mismatch: expected {expected}, found {actual[algorithm]}", fix)
    return actual


# --------------------------------------------------------------------------------------------
# downloading
# --------------------------------------------------------------------------------------------
@dataclass
class RetryPolicy:
    """How often and how patiently a download is retried after transient errors."""

    retries: int = 5  # tries after the first one that failed
    backoff: float = 2.0  # seconds before the first retry; doubles each time
    timeout: float = 60.0  # seconds a connection may stay silent
    sleep: Callable[[float], None] = time.sleep

    def delay(self, failures: int) -> float:
        return min(self.backoff * 2 ** (failures - 1), _MAX_BACKOFF)


class _Transient(Exception):
    """An error worth another try (internal)."""


def download(
    url: str,
    dest: str | Path,
    *,
    size: int | None = None,
    checksums: dict[str, str] | None = None,
    policy: RetryPolicy | None = None,
    progress: bool = True,
    keep_corrupt: bool = True,
) -> Path:
    """Download `url` to the file `dest`, resuming `dest.part` if an earlier try left one.

    Transient errors (connection refused or reset, timeouts, a short body, HTTP 408/429/5xx) are
    retried with exponential back-off; the retry budget is renewed whenever a try made progress.
    Once retries are spent, TransientDownloadError: running again later may succeed (and resumes).
    An unknown host name (an offline machine) and HTTP errors such as 404 fail at once (DownloadError).
    The finished file must have `size` bytes and the given checksums; on a mismatch it is moved to
    `<dest>.corrupt` (deleted instead when not `keep_corrupt`) and ChecksumError names the file,
    both values and the fix.
    """
    dest = Path(dest)
    policy = policy or RetryPolicy()
    checksums = checksums or {}
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    failures, last_error = 0, ""
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _fetch(url, part, size, policy.timeout, progress)
            break
        except _Transient as exc:
            last_error = str(exc)
        gained = (part.stat().st_size if part.exists() else 0) > before
        failures = 1 if gained else failures + 1
        if failures > policy.retries:
            got = part.stat().st_size if part.exists() else 0
            raise TransientDownloadError(
                f"{url}: download failed after {policy.retries + 1} tries without progress ({last_error}); "
                f"{got} bytes are kept in {part} and the next run resumes from there",
                f"Check the network and run again, or download {dest.name} yourself and put it in the folder named "
                "by dataset.source_dir",
            )
        wait = policy.delay(failures)
        log.warning("download of %s failed (%s); try %d of %d in %.1f s", url, last_error, failures + 1,
                    policy.retries + 1, wait)
        policy.sleep(wait)
    kept = f"it was moved to {dest.name}{CORRUPT_SUFFIX}" if keep_corrupt else "it was deleted"
    fix = (f"The download is corrupt or the file on the server changed: {kept} "
           f"and the next run downloads it again; or put a good copy of {dest.name} in dataset.source_dir.")
    try:
        verify_file(part, size, checksums, fix=fix, progress=progress)
    except ChecksumError as exc:
        if keep_corrupt:
            os.replace(part, dest.with_name(dest.name + CORRUPT_SUFFIX))
        else:
            part.unlink()
        raise ChecksumError(exc.failure.replace(str(part), str(dest)), fix) from None
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> None:
    """One try: append the missing bytes of `url` to `part`. Raises _Transient or DownloadError."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset == size:
        return  # an earlier try got every byte; verification follows
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    headers = {"User-Agent": "cascade-clip-downloader"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the server has no bytes after `offset`
            if size is None or offset == size:
                return
            part.unlink()
            raise _Transient(f"HTTP 416 for a range starting at {offset}; starting again from byte 0") from None
        if exc.code in _TRANSIENT_HTTP:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}", "The file may have moved: download it "
                            "yourself and put it in the folder named by dataset.source_dir") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, socket.gaierror) and reason.errno in _UNKNOWN_HOST:
            host = urllib.parse.urlsplit(url).hostname
            raise DownloadError(f"{url}: the host {host!r} is unknown ({reason.strerror}): this machine has no "
                                "internet access or no DNS", "Download the file elsewhere and put it in the folder "
                                "named by dataset.source_dir, or run again once the network is up") from None
        raise _Transient(_reason(exc)) from None
    with response:
        status = getattr(response, "status", None) or 200
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None and length.isdigit() else None
        if offset and status == 206:
            start = _range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink()
                raise _Transient(f"server answered a range starting at {start}, not {offset}; starting again")
            mode, expected = "ab", None if length is None else offset + length
        else:  # a full body: the server ignored the range (or there was none)
            offset, mode, expected = 0, "wb", length
        if size is not None and expected is not None and expected != size:
            log.warning("%s: server reports %d bytes, the catalog %d; the checksum decides", url, expected, size)
        total = size if size is not None else expected
        written = offset
        with open(part, mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                           unit_divisor=1024, desc=part.name.removesuffix(PART_SUFFIX),
                                           disable=not progress) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"connection lost after {written} bytes: {_reason(exc)}") from None
        if expected is not None and written < expected:
            raise _Transient(f"connection closed after {written} of {expected} bytes")


def _range_start(content_range: str) -> int | None:
    """The first byte of `Content-Range: bytes START-END/TOTAL`."""
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, socket.timeout):
        return "timed out"
    return str(reason or exc) or type(exc).__name__


# --------------------------------------------------------------------------------------------
# finding the sources of a dataset
# --------------------------------------------------------------------------------------------
def policy_from(cfg: DatasetConfig) -> RetryPolicy:
    return RetryPolicy(retries=cfg.download_retries, backoff=cfg.download_backoff, timeout=cfg.download_timeout)


def _content_candidates(base: Path, source: Source) -> list[Path]:
    content = Path(source.content) if source.content else Path()
    candidates = [base / content, base / source.stem / content]
    if source.content:
        candidates.append(base / content.name)
    candidates += [base / d for d in source.dirs] + [base / d / content for d in source.dirs]
    unique = []
    for c in candidates:
        if c not in unique:
            unique.append(c)
    return unique


def _has_markers(folder: Path, source: Source) -> bool:
    return folder.is_dir() and all(next(iter(folder.glob(m)), None) is not None for m in source.markers)


def find_content(base: Path, source: Source) -> Path | None:
    """The folder under `base` holding `source`'s extracted content, if any."""
    for candidate in _content_candidates(base, source):
        if _has_markers(candidate, source):
            return candidate
    return None


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _extract_cached(archive: Path, source: Source, cache: Path, progress: bool) -> Path:
    """Extract `archive` into the cache once; later calls reuse it while the archive is unchanged."""
    target = cache / "extracted" / source.stem
    stamp_file = target / ".source.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == _stamp(archive):
        found = find_content(target, source)
        if found is not None:
            return found
    log.info("extracting %s into %s", archive, target)
    extract(archive, target, progress=progress)
    write_json(stamp_file, _stamp(archive))
    found = find_content(target, source)
    if found is None:
        raise DownloadError(
            f"{archive}: extracted, but {source.content or 'its top folder'} does not hold "
            f"{', '.join(source.markers)}; this is not the official {source.file}: replace it with the official file"
        )
    return found


def read_pin(pin: Path) -> str:
    """The sha256 recorded in a pin file."""
    try:
        return str(json.loads(pin.read_text())["sha256"]).lower()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ChecksumError(f"{pin}: unreadable pin file ({exc}); delete it, and the next run pins the file "
                            "anew") from None


def _expected(source: Source, pin: Path) -> tuple[dict[str, str], str]:
    """(checksums, extra fix) that a copy of `source` must match: the catalog's, or, for a source without
    published checksums, the sha256 pinned at its first use (none before that)."""
    if source.checksums or not pin.is_file():
        return source.checksums, ""
    return {"sha256": read_pin(pin)}, f" If the new file is the one you want, delete {pin} to pin it anew."


def _pin_first_use(path: Path, source: Source, pin: Path, progress: bool) -> None:
    """Record `path`'s size and sha256 in `pin` if `source` has no published checksums and no pin yet."""
    if source.checksums or pin.is_file():
        return
    sha256 = file_checksums(path, ("sha256",), progress=progress)["sha256"]
    size = path.stat().st_size
    write_json(pin, {"file": source.file, "url": source.url, "size": size, "sha256": sha256})
    log.warning("pinned %s at its first use (no published checksum): %d bytes, sha256=%s; delete %s to re-pin",
                source.file, size, sha256, pin)


def locate_source(source: Source, cfg: DatasetConfig, cache: Path, *, progress: bool = True) -> Path | None:
    """The content folder of one source (see the module docstring for the order); None if missing and
    downloads are off."""
    downloads = cache / "downloads"
    pin = downloads / (source.file + PIN_SUFFIX)
    checksums, repin = _expected(source, pin) if cfg.verify_checksums else ({}, "")
    fix = (f"Replace it with the official {source.file} ({source.url}), or set dataset.verify_checksums: false if "
           f"you trust it.{repin}")
    if cfg.source_dir is not None:
        source_dir = Path(cfg.source_dir)
        found = find_content(source_dir, source)
        if found is not None:
            log.info("%s: using the extracted copy in %s", source.file, found)
            return found
        user_file = source_dir / source.file
        if user_file.is_file():
            if cfg.verify_checksums:
                verify_file(user_file, source.size, checksums, fix=fix, progress=progress)
                _pin_first_use(user_file, source, pin, progress)
            if not source.archive:
                return source_dir
            return _extract_cached(user_file, source, cache, progress)
    if source.archive:
        found = find_content(cache / "extracted" / source.stem, source)
        if found is not None and (cache / "extracted" / source.stem / ".source.json").exists():
            return found
    local = downloads / source.file
    if local.is_file():
        if cfg.verify_checksums:
            verify_file(local, source.size, checksums, progress=progress,
                        fix=f"Delete {local} and run again to download it anew.{repin}")
    elif cfg.download:
        log.info("downloading %s from %s", source.file, source.url)
        try:
            download(source.url, local, size=source.size, checksums=checksums, policy=policy_from(cfg),
                     progress=progress)
        except ChecksumError as exc:
            raise ChecksumError(exc.failure, f"{exc.advice}{repin}") from None
    else:
        return None
    if cfg.verify_checksums:
        _pin_first_use(local, source, pin, progress)
    if not source.archive:
        return downloads
    return _extract_cached(local, source, cache, progress)


def locate_sources(entry: DatasetEntry, cfg: DatasetConfig, splits: Iterable[str], *,
                   progress: bool = True) -> dict[str, Path]:
    """Content folder of every source that `splits` of `entry` need, keyed by source name."""
    cache = Path(cfg.cache_dir) / entry.name
    roots, missing = {}, []
    for source in dataset_sources(entry, splits, cfg.mirrors):
        root = locate_source(source, cfg, cache, progress=progress)
        if root is None:
            missing.append(source)
        else:
            roots[source.key] = root
    if missing:
        where = f"dataset.source_dir ({cfg.source_dir})" if cfg.source_dir else "dataset.source_dir (not set)"
        lines = "\n".join(f"  - {s.file}  ({s.url})" for s in missing)
        raise MissingSourceError(
            f"dataset {entry.name!r}: {len(missing)} source file(s) not found in {where} nor in the cache "
            f"{cache}, and dataset.download is false:\n{lines}\n"
            "Put these files (or their extracted folders) in dataset.source_dir, or set dataset.download: true."
        )
    return roots
