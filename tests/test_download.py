"""Resumable downloads against a real HTTP server on 127.0.0.1, checksums, retries, and finding sources."""

import hashlib
import io
import json
import shutil
import tarfile

import numpy as np
import pytest

from pipeline.config import DatasetConfig
from pipeline.data.catalog import DatasetEntry
from pipeline.data.download import (
    ChecksumError,
    DownloadError,
    MissingSourceError,
    RetryPolicy,
    TransientDownloadError,
    download,
    locate_sources,
    verify_file,
)
from tests.http_server import FileServer

PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


def quick(retries=0, sleeps=None) -> RetryPolicy:
    return RetryPolicy(retries=retries, backoff=0.5, timeout=10,
                       sleep=(sleeps.append if sleeps is not None else lambda s: None))


def test_interrupted_download_resumes_with_a_range_request(tmp_path, capsys):
    dest = tmp_path / "cache" / "file.bin"
    with FileServer(PAYLOAD, plan=["cut:100000"]) as server:
        with pytest.raises(TransientDownloadError, match="resumes from there"):
            download(server.url(), dest, size=len(PAYLOAD), checksums={"md5": MD5}, policy=quick(0), progress=False)
        part = dest.with_name("file.bin.part")
        assert part.read_bytes() == PAYLOAD[:100_000] and not dest.exists()
        download(server.url(), dest, size=len(PAYLOAD), checksums={"md5": MD5}, policy=quick(0), progress=True)
    assert [r["range"] for r in server.requests] == [None, "bytes=100000-"]
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert "file.bin" in capsys.readouterr().err  # the progress bar


def test_transient_errors_are_retried_with_exponential_back_off(tmp_path):
    sleeps = []
    with FileServer(PAYLOAD, plan=["cut:50000", "503", "503", "serve"]) as server:
        download(server.url(), tmp_path / "f.bin", checksums={"md5": MD5}, policy=quick(3, sleeps), progress=False)
    assert [r["range"] for r in server.requests] == [None, "bytes=50000-", "bytes=50000-", "bytes=50000-"]
    assert sleeps == [0.5, 1.0, 2.0]  # the cut try made progress (budget renewed); the 503s double the wait
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_retries_end_with_a_transient_error_that_keeps_the_partial_file(tmp_path):
    with FileServer(PAYLOAD, plan=["503"] * 5) as server:
        with pytest.raises(TransientDownloadError, match=r"after 3 tries.*HTTP 503"):
            download(server.url(), tmp_path / "f.bin", policy=quick(2), progress=False)
    assert len(server.requests) == 3


def test_permanent_http_errors_are_not_retried(tmp_path):
    with FileServer(PAYLOAD, plan=["404"]) as server:
        with pytest.raises(DownloadError, match=r"HTTP 404.*dataset\.source_dir") as info:
            download(server.url(), tmp_path / "f.bin", policy=quick(5), progress=False)
    assert not isinstance(info.value, TransientDownloadError) and len(server.requests) == 1


def test_checksum_mismatch_names_the_file_both_values_and_the_fix(tmp_path):
    wrong = "0" * 32
    with FileServer(PAYLOAD) as server:
        with pytest.raises(ChecksumError) as info:
            download(server.url(), tmp_path / "f.bin", checksums={"md5": wrong}, policy=quick(0), progress=False)
    message = str(info.value)
    assert str(tmp_path / "f.bin") in message and f"expected {wrong}" in message and f"found {MD5}" in message
    assert "downloads it again" in message and "dataset.source_dir" in message
    assert (tmp_path / "f.bin.corrupt").read_bytes() == PAYLOAD and not (tmp_path / "f.bin").exists()


def test_a_caller_can_have_a_bad_download_deleted_and_give_its_own_advice(tmp_path):
    wrong = "0" * 32
    with FileServer(PAYLOAD) as server:
        with pytest.raises(ChecksumError) as info:
            download(server.url(), tmp_path / "f.bin", checksums={"md5": wrong}, policy=quick(0), progress=False,
                     keep_corrupt=False)
    assert list(tmp_path.iterdir()) == []  # nothing kept: the next call downloads afresh
    assert info.value.failure == f"{tmp_path / 'f.bin'}: md5 mismatch: expected {wrong}, found {MD5}"
    assert "it was deleted" in info.value.advice and str(info.value).startswith(info.value.failure + ". ")


def test_errors_separate_what_failed_from_the_advice(tmp_path):
    with FileServer(PAYLOAD, plan=["404", "503"]) as server:
        with pytest.raises(DownloadError) as gone:
            download(server.url(), tmp_path / "f.bin", policy=quick(0), progress=False)
        with pytest.raises(TransientDownloadError) as busy:
            download(server.url(), tmp_path / "f.bin", policy=quick(0), progress=False)
    assert gone.value.failure == f"{server.url()}: HTTP 404 Not Found"
    assert busy.value.failure.endswith("the next run resumes from there") and "HTTP 503" in busy.value.failure
    for error in (gone.value, busy.value):
        assert "dataset.source_dir" in error.advice and "dataset.source_dir" not in error.failure
        assert str(error) == f"{error.failure}. {error.advice}"


def test_verify_file_returns_the_digests_it_checked(tmp_path):
    (tmp_path / "f.bin").write_bytes(PAYLOAD)
    assert verify_file(tmp_path / "f.bin", len(PAYLOAD), {"md5": MD5}, fix="") == {"md5": MD5}


def test_size_mismatch_is_an_error(tmp_path):
    with FileServer(PAYLOAD) as server:
        with pytest.raises(ChecksumError, match=r"size mismatch: expected 299999 bytes, found 300000"):
            download(server.url(), tmp_path / "f.bin", size=299_999, policy=quick(0), progress=False)


def test_a_server_that_ignores_ranges_gets_a_fresh_download(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(b"stale bytes")
    with FileServer(PAYLOAD, plan=["full"]) as server:
        download(server.url(), tmp_path / "f.bin", checksums={"md5": MD5}, policy=quick(0), progress=False)
    assert server.requests[0]["range"] == "bytes=11-"
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_a_complete_partial_file_is_only_verified(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD)
    download("http://127.0.0.1:9/never", tmp_path / "f.bin", size=len(PAYLOAD), checksums={"md5": MD5},
             policy=quick(0), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_file_urls_work(tmp_path):
    (tmp_path / "src.bin").write_bytes(PAYLOAD)
    download((tmp_path / "src.bin").as_uri(), tmp_path / "out" / "f.bin", checksums={"md5": MD5}, progress=False)
    assert (tmp_path / "out" / "f.bin").read_bytes() == PAYLOAD


# --------------------------------------------------------------------------------------------
# locate_sources: source_dir, cache, download
# --------------------------------------------------------------------------------------------
def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


ARCHIVE = tar_bytes({"pack/data/list.txt": b"a\nb\n", "pack/data/x.bin": b"x"})


def fake_entry(url: str, md5: str | None = None, *, sized: bool = True) -> DatasetEntry:
    spec = {"file": "pack.tgz", "url": url, "splits": ["train", "val"], "content": "pack/data", "markers": ["list.txt"]}
    if sized:
        spec["size"] = len(ARCHIVE)
    if md5:
        spec["md5"] = md5
    return DatasetEntry(name="fake", description="fake", available=True, classes=("a",), unseen_splits={"s": ()},
                        default_split="s", templates="single", extra={"sources": {"pack": spec}})


def cfg_for(tmp_path, **kw) -> DatasetConfig:
    return DatasetConfig(cache_dir=tmp_path / "cache", download_retries=0, download_backoff=0, **kw)


def test_missing_sources_are_downloaded_extracted_and_cached(tmp_path):
    with FileServer(ARCHIVE) as server:
        entry = fake_entry(server.url("pack.tgz"), hashlib.md5(ARCHIVE).hexdigest())
        roots = locate_sources(entry, cfg_for(tmp_path), ("train",), progress=False)
        again = locate_sources(entry, cfg_for(tmp_path), ("train",), progress=False)
    assert roots == again == {"pack": tmp_path / "cache/fake/extracted/pack/pack/data"}
    assert (roots["pack"] / "list.txt").read_text() == "a\nb\n"
    assert (tmp_path / "cache/fake/downloads/pack.tgz").read_bytes() == ARCHIVE
    assert len(server.requests) == 1  # the second call used the cache
    assert not list(tmp_path.rglob("*.pin.json"))  # a published checksum needs no pin


def test_source_dir_archives_are_checked_before_use(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/pack.tgz").write_bytes(ARCHIVE)
    entry = fake_entry("http://127.0.0.1:9/pack.tgz", "f" * 32)
    with pytest.raises(ChecksumError) as info:
        locate_sources(entry, cfg_for(tmp_path, source_dir=tmp_path / "mine"), ("val",), progress=False)
    assert "pack.tgz: md5 mismatch" in str(info.value) and "f" * 32 in str(info.value)
    assert hashlib.md5(ARCHIVE).hexdigest() in str(info.value) and "verify_checksums: false" in str(info.value)
    roots = locate_sources(entry, cfg_for(tmp_path, source_dir=tmp_path / "mine", verify_checksums=False), ("val",),
                           progress=False)
    assert (roots["pack"] / "x.bin").read_bytes() == b"x"


def test_extracted_folders_in_source_dir_need_nothing_else(tmp_path):
    (tmp_path / "mine/data").mkdir(parents=True)
    (tmp_path / "mine/data/list.txt").write_text("a\n")
    entry = fake_entry("http://127.0.0.1:9/pack.tgz")
    roots = locate_sources(entry, cfg_for(tmp_path, source_dir=tmp_path / "mine", download=False), ("train",),
                           progress=False)
    assert roots == {"pack": tmp_path / "mine/data"} and not (tmp_path / "cache").exists()


def test_without_downloads_the_missing_files_are_listed(tmp_path):
    entry = fake_entry("http://example.invalid/pack.tgz")
    with pytest.raises(MissingSourceError, match=r"pack\.tgz  \(http://example\.invalid/pack\.tgz\)"):
        locate_sources(entry, cfg_for(tmp_path, source_dir=tmp_path, download=False), ("train",), progress=False)


def test_an_unknown_host_fails_at_once_with_the_offline_fix(tmp_path):
    sleeps = []
    with pytest.raises(DownloadError, match=r"is unknown.*dataset\.source_dir") as info:
        download("http://no-such-host.invalid/f.bin", tmp_path / "f.bin", policy=quick(5, sleeps), progress=False)
    assert not isinstance(info.value, TransientDownloadError) and sleeps == []


# --------------------------------------------------------------------------------------------
# sources without a published checksum: pinned at their first use
# --------------------------------------------------------------------------------------------
OTHER = tar_bytes({"pack/data/list.txt": b"c\n", "pack/data/x.bin": b"y"})  # another file under the same name


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_pin_mismatch(message: str, path, pin, pinned: bytes, found: bytes) -> None:
    assert message.startswith(f"{path}: sha256 mismatch: expected {sha256(pinned)}, found {sha256(found)}."), message
    assert f"delete {pin} to pin it anew" in message


def test_a_source_file_without_checksums_is_pinned_at_first_use_and_must_match_after(tmp_path, caplog):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pack.tgz").write_bytes(ARCHIVE)
    entry = fake_entry("http://127.0.0.1:9/pack.tgz", sized=False)
    cfg = cfg_for(tmp_path, source_dir=mine, download=False)
    locate_sources(entry, cfg, ("train",), progress=False)
    pin = tmp_path / "cache/fake/downloads/pack.tgz.pin.json"
    record = json.loads(pin.read_text())
    assert (record["file"], record["size"], record["sha256"]) == ("pack.tgz", len(ARCHIVE), sha256(ARCHIVE))
    assert f"pinned pack.tgz at its first use (no published checksum): {len(ARCHIVE)} bytes, " \
           f"sha256={sha256(ARCHIVE)}; delete {pin} to re-pin" in caplog.text
    assert not list(pin.parent.glob(".*tmp-*"))  # written aside, then renamed

    (mine / "pack.tgz").write_bytes(OTHER)
    with pytest.raises(ChecksumError) as info:
        locate_sources(entry, cfg, ("train",), progress=False)
    assert_pin_mismatch(str(info.value), mine / "pack.tgz", pin, ARCHIVE, OTHER)

    pin.unlink()  # the user accepts the new file
    roots = locate_sources(entry, cfg, ("train",), progress=False)
    assert json.loads(pin.read_text())["sha256"] == sha256(OTHER)
    assert (roots["pack"] / "list.txt").read_text() == "c\n"


def test_a_download_without_checksums_is_pinned_and_a_changed_copy_or_server_file_is_refused(tmp_path):
    cache = tmp_path / "cache/fake"
    local, pin = cache / "downloads/pack.tgz", cache / "downloads/pack.tgz.pin.json"
    with FileServer(ARCHIVE) as server:
        entry = fake_entry(server.url("pack.tgz"), sized=False)
        locate_sources(entry, cfg_for(tmp_path), ("train",), progress=False)
    assert json.loads(pin.read_text())["sha256"] == sha256(ARCHIVE)

    shutil.rmtree(cache / "extracted")  # the cached copy is used again: it changed
    local.write_bytes(OTHER)
    with pytest.raises(ChecksumError) as info:
        locate_sources(entry, cfg_for(tmp_path), ("train",), progress=False)
    assert_pin_mismatch(str(info.value), local, pin, ARCHIVE, OTHER)

    local.unlink()  # downloaded again: the server now serves another file
    with FileServer(OTHER) as server:
        with pytest.raises(ChecksumError) as info:
            locate_sources(fake_entry(server.url("pack.tgz"), sized=False), cfg_for(tmp_path), ("train",),
                           progress=False)
    assert_pin_mismatch(str(info.value), local, pin, ARCHIVE, OTHER)
    assert (cache / "downloads/pack.tgz.corrupt").read_bytes() == OTHER and not local.exists()
