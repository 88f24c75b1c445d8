"""Safe extraction: members that would escape the target, links and device files are refused by name."""

import io
import stat
import tarfile
import zipfile

import pytest

from pipeline.data.archive import ArchiveError, UnsafeArchiveError, archive_stem, extract, member_problem


def tar_with(path, members, mode="w"):
    """members: (name, kind, payload) with kind file | dir | symlink | hardlink | chardev | fifo."""
    with tarfile.open(path, mode) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                data = payload
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            elif kind == "chardev":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


GOOD = [("top", "dir", None), ("top/a.txt", "file", b"alpha"), ("top/sub/b.bin", "file", b"\x00\x01beta")]


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tgz", "w:gz"), (".tar.gz", "w:gz")])
def test_plain_archives_extract_completely(tmp_path, suffix, mode):
    archive = tar_with(tmp_path / f"data{suffix}", GOOD, mode)
    out = extract(archive, tmp_path / "out", progress=False)
    assert (out / "top/a.txt").read_bytes() == b"alpha" and (out / "top/sub/b.bin").read_bytes() == b"\x00\x01beta"
    assert archive_stem(archive) == "data"


def test_zip_extracts_completely(tmp_path):
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:
        z.writestr("val2017/", b"")
        z.writestr("val2017/1.png", b"png")
    out = extract(tmp_path / "data.zip", tmp_path / "out", progress=True)
    assert (out / "val2017/1.png").read_bytes() == b"png"


@pytest.mark.parametrize("member,kind,payload,reason", [
    ("../evil.txt", "file", b"x", "leaves the target folder"),
    ("top/../../evil.txt", "file", b"x", "leaves the target folder"),
    ("/tmp/evil.txt", "file", b"x", "absolute path"),
    ("top/link", "symlink", "/etc/passwd", "symbolic link"),
    ("top/inner_link", "symlink", "a.txt", "symbolic link"),
    ("top/hard", "hardlink", "../../etc/passwd", "hard link"),
    ("top/null", "chardev", None, "device file"),
    ("top/pipe", "fifo", None, "FIFO"),
])
def test_unsafe_tar_members_are_refused_and_nothing_is_extracted(tmp_path, member, kind, payload, reason):
    archive = tar_with(tmp_path / "evil.tar", GOOD + [(member, kind, payload)])
    with pytest.raises(UnsafeArchiveError) as info:
        extract(archive, tmp_path / "work" / "out", progress=False)
    assert repr(member) in str(info.value) and reason in str(info.value)
    assert not (tmp_path / "work" / "out").exists()
    assert not (tmp_path / "work").exists()  # nothing at all: the temporary folder and the parent it created
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "evil.txt").exists()


@pytest.mark.parametrize("member,kind,payload,reason", [
    ("../evil.txt", "file", b"x", "OutsideDestinationError"),
    ("top/link", "symlink", "/etc/passwd", "AbsoluteLinkError"),
    ("top/hard", "hardlink", "../../etc/passwd", "LinkOutsideDestinationError"),
    ("top/null", "chardev", None, "SpecialFileError"),
])
def test_tarfiles_data_filter_refuses_on_its_own(tmp_path, monkeypatch, member, kind, payload, reason):
    # the standard library's filter="data" is the first line of defence: with our own checks switched off,
    # what it refuses is still refused, with a clear error, and nothing is written
    import pipeline.data.archive as module

    monkeypatch.setattr(module, "member_problem", lambda name: None)
    monkeypatch.setattr(module, "_tar_type_problem", lambda member: None)
    archive = tar_with(tmp_path / "evil.tar", GOOD + [(member, kind, payload)])
    with pytest.raises(UnsafeArchiveError) as info:
        extract(archive, tmp_path / "work" / "out", progress=False)
    message = str(info.value)
    assert f"{member!r}: refused by tarfile's data filter ({reason}: " in message, message
    assert "1 unsafe member" in message and "download it again" in message
    assert not (tmp_path / "work").exists()


def test_every_unsafe_member_is_listed(tmp_path):
    archive = tar_with(tmp_path / "evil.tgz", [("../a", "file", b"1"), ("/b", "file", b"2"), ("c", "symlink", "..")],
                       "w:gz")
    with pytest.raises(UnsafeArchiveError, match=r"3 unsafe member") as info:
        extract(archive, tmp_path / "out", progress=False)
    assert all(name in str(info.value) for name in ("'../a'", "'/b'", "'c'"))


@pytest.mark.parametrize("name,reason", [("../evil.txt", "leaves the target folder"), ("/abs.txt", "absolute path"),
                                         ("C:/win.txt", "absolute path"), ("a\\..\\..\\b", "backslash")])
def test_unsafe_zip_paths_are_refused(tmp_path, name, reason):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
        z.writestr("ok.txt", b"ok")
        z.writestr(zipfile.ZipInfo(name), b"x")
    with pytest.raises(UnsafeArchiveError, match=reason) as info:
        extract(tmp_path / "evil.zip", tmp_path / "out", progress=False)
    assert repr(name) in str(info.value) and not (tmp_path / "out").exists()


def test_zip_symlinks_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match=r"'link': symbolic link"):
        extract(tmp_path / "evil.zip", tmp_path / "out", progress=False)


def test_member_paths_that_stay_inside_are_allowed():
    assert member_problem("a/./b/../c.txt") is None
    assert member_problem("a/../../c.txt") is not None


def test_truncated_archives_are_reported(tmp_path):
    archive = tar_with(tmp_path / "data.tgz", GOOD + [("top/big.bin", "file", bytes(range(256)) * 4000)], "w:gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match="truncated or corrupt"):
        extract(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ArchiveError, match="not a readable zip"):
        extract(tmp_path / "bad.zip", tmp_path / "out2", progress=False)


# --------------------------------------------------------------------------------------------
# size and member limits (decompression bombs)
# --------------------------------------------------------------------------------------------
def small_archive(tmp_path, kind: str):
    """Four members: a folder and three files of 600 bytes (1,800 bytes in all)."""
    members = [("top", "dir", None)] + [(f"top/{n}.bin", "file", bytes(600)) for n in "abc"]
    if kind == "zip":
        with zipfile.ZipFile(tmp_path / "small.zip", "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("top/", b"")
            for name, _, data in members[1:]:
                z.writestr(name, data)
        return tmp_path / "small.zip"
    return tar_with(tmp_path / f"small.{kind}", members, "w:gz" if kind == "tgz" else "w")


@pytest.fixture
def writes(monkeypatch):
    """Files the extractor opens for writing."""
    import pipeline.data.archive as module

    opened = []

    def spy(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            opened.append(str(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(module, "open", spy, raising=False)
    return opened


@pytest.mark.parametrize("kind", ["zip", "tar", "tgz"])
@pytest.mark.parametrize(("limit", "figure"), [
    ({"max_bytes": 1000}, {"zip": "1,800 bytes uncompressed", "tar": "1,200 or more bytes uncompressed"}),
    ({"max_members": 2}, {"zip": "4 members", "tar": "3 or more members"}),
], ids=["bytes", "members"])
def test_archive_over_a_limit_is_refused_before_anything_is_written(tmp_path, writes, kind, limit, figure):
    archive = small_archive(tmp_path, kind)
    with pytest.raises(ArchiveError) as info:
        extract(archive, tmp_path / "work" / "out", progress=False, **limit)
    message = str(info.value)
    [(key, value)] = limit.items()
    unit = "bytes" if key == "max_bytes" else "members"
    assert message.startswith(f"{archive}: {figure['zip' if kind == 'zip' else 'tar']}, more than the limit of "
                              f"{value:,} {unit}"), message
    assert "decompression bomb" in message and f"{key}=" in message
    assert writes == [] and not (tmp_path / "work").exists()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_yielding_more_bytes_than_its_header_declares_is_cut_off(tmp_path, monkeypatch, kind):
    """A zip bomb whose header lies about a member's size: extraction stops at the declared size."""
    archive = small_archive(tmp_path, kind)
    reader = (zipfile.ZipFile, "open") if kind == "zip" else (tarfile.TarFile, "extractfile")
    monkeypatch.setattr(*reader, lambda *args, **kwargs: io.BytesIO(bytes(50_000)))
    with pytest.raises(ArchiveError) as info:
        extract(archive, tmp_path / "out", progress=False)
    assert str(info.value).startswith(f"{archive}: member 'top/a.bin' holds more than the 600 bytes its header "
                                      "declares"), str(info.value)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == [archive.name]


def test_limits_are_far_above_the_largest_dataset_archive():
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(extract).parameters.items()}
    assert defaults["max_bytes"] >= 64 << 30 and defaults["max_members"] >= 2_000_000  # COCO train2017: 19 GB, 118k
