"""Resumable downloads against a real HTTP server on 127.0.0.1, checksums, retries, and finding sources."""

import hashlib
import io
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
)

PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class FileServer:
    """Serves one payload at /<name>, with HTTP Range support; `plan` scripts each request's answer:
    "serve", "cut:N" (send N body bytes, then drop the connection), "full" (ignore Range), or a status code."""

    def __init__(self, payload: bytes, plan=()):
        self.payload, self.plan, self.requests = payload, list(plan), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                action = server.plan.pop(0) if server.plan else "serve"
                if action.isdigit():
                    self.send_error(int(action))
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and action != "full":
                    start = int(match.group(1))
                    if start >= len(server.payload):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(server.payload)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                else:
                    self.send_response(200)
                body = server.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action.startswith("cut:"):
                    body = body[: int(action[4:])]
                self.wfile.write(body)
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, name="file.bin") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


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


def fake_entry(url: str, md5: str | None = None) -> DatasetEntry:
    spec = {"file": "pack.tgz", "url": url, "size": len(ARCHIVE), "splits": ["train", "val"],
            "content": "pack/data", "markers": ["list.txt"]}
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
