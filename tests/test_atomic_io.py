import pytest
import torch
from safetensors import safe_open

from pipeline.io import atomic_dir, atomic_file, sweep_stale, write_json, write_safetensors


def test_atomic_dir_appears_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_midway_leaves_previous_output_and_no_debris(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk on fire")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_with_no_previous_output_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "artifacts" / "deep" / "out") as tmp:
            (tmp / "x").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # not even the parent folders it created


def test_stale_leftovers_of_a_killed_run_are_swept(tmp_path):
    (tmp_path / ".out.tmp-abc").mkdir()
    (tmp_path / ".out.old-123").mkdir()
    (tmp_path / ".other.tmp-1").mkdir()
    removed = sweep_stale(tmp_path / "out")
    assert len(removed) == 2
    assert [p.name for p in tmp_path.iterdir()] == [".other.tmp-1"]


def test_atomic_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": 1})
    with pytest.raises(ValueError):
        with atomic_file(path, "w") as handle:
            handle.write("{broken")
            raise ValueError
    assert path.read_text().strip() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_safetensors_files_are_byte_stable_and_load_back(tmp_path):
    # safetensors alone writes its metadata in hash order: ten saves, ten different files
    tensors = {"b.weight": torch.arange(6.0).view(2, 3), "a.bias": torch.ones(3, dtype=torch.float16), "n": torch.tensor([7])}
    metadata = {name: name * 3 for name in "fedcba"}
    paths = [write_safetensors(tensors, tmp_path / f"m{i}.safetensors", metadata) for i in range(10)]
    assert len({p.read_bytes() for p in paths}) == 1
    with safe_open(str(paths[0]), framework="pt") as f:
        assert f.metadata() == metadata
        assert sorted(f.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor) and f.get_tensor(name).dtype == tensor.dtype
    assert int.from_bytes(paths[0].read_bytes()[:8], "little") % 8 == 0
    assert not list(tmp_path.glob(".*tmp-*"))


def test_pause_before_rename_holds_the_complete_folder_aside_then_renames_it(tmp_path, monkeypatch):
    """The known point where the fault-injection tests kill a stage: written aside, not yet in place."""
    import threading
    import time

    from pipeline.io import PAUSE_BEFORE_RENAME_ENV

    monkeypatch.setenv(PAUSE_BEFORE_RENAME_ENV, "3")
    target = tmp_path / "out"

    def write():
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new")

    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".out.tmp-*/a.txt")) and time.monotonic() < deadline:
        time.sleep(0.005)
    [aside] = tmp_path.glob(".out.tmp-*")
    assert (aside / "a.txt").read_text() == "new" and not target.exists()
    writer.join()
    assert (target / "a.txt").read_text() == "new" and not aside.exists()


@pytest.fixture
def disk_log(monkeypatch):
    """Every fsync (as the path its fd names) and rename, in order, through the real calls."""
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the fsynced files")
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst, **kw):
        events.append(("rename", str(src), str(dst)))
        real_rename(src, dst, **kw)

    def replace(src, dst, **kw):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events


def at(events, event) -> int:
    assert event in events, f"{event} not in {events}"
    return events.index(event)


@pytest.mark.parametrize("previous", [False, True], ids=["new", "replacing"])
def test_atomic_dir_fsyncs_every_file_and_folder_before_the_rename_and_the_parent_after(tmp_path, disk_log, previous):
    target = tmp_path / "out"
    if previous:
        target.mkdir()
        (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "model.bin").write_bytes(b"weights")
        (tmp / "sub" / "b.txt").write_text("b")
        aside = str(tmp)
    renamed = at(disk_log, ("rename", aside, str(target)))
    for path in (f"{aside}/model.bin", f"{aside}/sub/b.txt", f"{aside}/sub", aside):
        assert at(disk_log, ("fsync", path)) < renamed, path
    assert max(i for i, e in enumerate(disk_log) if e == ("fsync", str(tmp_path))) > renamed
    assert (target / "model.bin").read_bytes() == b"weights"


def test_atomic_file_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, disk_log):
    write_json(tmp_path / "m.json", {"a": 1})
    [(kind, aside, target)] = [e for e in disk_log if e[0] == "rename"]
    renamed = disk_log.index((kind, aside, target))
    assert target == str(tmp_path / "m.json")
    assert at(disk_log, ("fsync", aside)) < renamed < at(disk_log, ("fsync", str(tmp_path)))
