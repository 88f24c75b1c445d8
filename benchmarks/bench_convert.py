"""Benchmark of the VOC converter on realistic-size fake data (run by hand, not in the tests).

    python -m benchmarks.bench_convert --n 500 --workers 2

Builds a fake VOCtrainval_11-May-2012.tar and benchmark.tgz with N images of 500x375 pixels (a
third VOC train, a third VOC val, a third SBD-only with .mat labels; labels are a few solid
ellipses, like real annotations), then times the extraction and the conversion separately and
reports files/s and peak memory (the main process's and the worker processes' maximum RSS, and
with --tracemalloc the peak of Python allocations in the main process).
"""

from __future__ import annotations

import argparse
import io
import resource
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import ellipse

from pipeline.config import DatasetConfig
from pipeline.data.catalog import get_dataset
from pipeline.data.download import locate_sources
from pipeline.data.prepared import prepare_dataset
from tests.fake_datasets import add_bytes, palette_png_bytes, sbd_mat_bytes

HEIGHT, WIDTH = 375, 500


def scene(rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """A smooth-ish JPEG photo stand-in and its label: background plus 1-4 class ellipses with boundaries."""
    base = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
    photo = Image.fromarray(base).resize((WIDTH, HEIGHT), Image.BILINEAR)
    noise = rng.normal(0, 12, (HEIGHT, WIDTH, 3))
    photo = Image.fromarray(np.clip(np.asarray(photo) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    label = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = rng.integers(40, HEIGHT - 40), rng.integers(40, WIDTH - 40)
        ry, rx = rng.integers(20, 150), rng.integers(20, 200)
        rows, cols = ellipse(cy, cx, ry + 3, rx + 3, shape=label.shape)
        label[rows, cols] = 255  # boundary band, as VOC draws it
        rows, cols = ellipse(cy, cx, ry, rx, shape=label.shape)
        label[rows, cols] = rng.integers(1, 21)
    return buffer.getvalue(), label


def build(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    ids = [f"2008_{i:06d}" for i in range(n)]
    voc_train, voc_val, sbd_only = ids[0::3], ids[1::3], ids[2::3]
    base = "VOCdevkit/VOC2012"
    with tarfile.open(folder / "VOCtrainval_11-May-2012.tar", "w") as voc, \
            tarfile.open(folder / "benchmark.tgz", "w:gz") as sbd:
        for image_id in ids:
            jpeg, label = scene(rng)
            add_bytes(voc, f"{base}/JPEGImages/{image_id}.jpg", jpeg)
            if image_id in sbd_only:
                sbd_label = label.copy()
                sbd_label[sbd_label == 255] = 0  # SBD has no boundary band
                add_bytes(sbd, f"benchmark_RELEASE/dataset/cls/{image_id}.mat", sbd_mat_bytes(sbd_label))
            else:
                add_bytes(voc, f"{base}/SegmentationClass/{image_id}.png", palette_png_bytes(label))
        add_bytes(voc, f"{base}/ImageSets/Segmentation/train.txt", "".join(f"{i}\n" for i in voc_train).encode())
        add_bytes(voc, f"{base}/ImageSets/Segmentation/val.txt", "".join(f"{i}\n" for i in voc_val).encode())
        add_bytes(sbd, "benchmark_RELEASE/dataset/train.txt", "".join(f"{i}\n" for i in sbd_only).encode())
        add_bytes(sbd, "benchmark_RELEASE/dataset/val.txt", b"")


def cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="images to generate")
    parser.add_argument("--workers", type=int, default=2, help="conversion processes (dataset.workers)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also trace Python allocations in the main process (slows it down: timings are then pessimistic)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        start = time.perf_counter()
        build(tmp / "src", args.n)
        built = time.perf_counter()
        size = sum(p.stat().st_size for p in (tmp / "src").iterdir())
        print(f"built {args.n} images of {WIDTH}x{HEIGHT} ({size / 2**20:.1f} MiB of archives) in {built - start:.1f} s")
        cfg = DatasetConfig(name="voc12", source_dir=tmp / "src", cache_dir=tmp / "cache", verify_checksums=False,
                            download=False, workers=args.workers)
        if args.tracemalloc:
            tracemalloc.start()
        t0 = time.perf_counter()
        roots = locate_sources(get_dataset("voc12"), cfg, ("train", "val"), progress=False)
        t1 = time.perf_counter()
        root = tmp / "prepared"
        root.mkdir()
        cpu0 = cpu_seconds()
        summary = prepare_dataset(cfg, 0, root, sources=roots, progress=False)
        t2 = time.perf_counter()
        cpu_main, cpu_workers = (b - a for a, b in zip(cpu0, cpu_seconds()))
        traced_peak = tracemalloc.get_traced_memory()[1] if args.tracemalloc else None
        tracemalloc.stop()
    files = summary["counts"]["images_train"] + summary["counts"]["images_val"]
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"extraction: {t1 - t0:.2f} s ({args.n / (t1 - t0):.0f} images/s)")
    print(f"conversion: {files} image/label pairs in {t2 - t1:.2f} s = {files / (t2 - t1):.1f} files/s "
          f"with {args.workers} worker(s); CPU time: main process {cpu_main:.2f} s, workers {cpu_workers:.2f} s "
          f"(the workers' share includes starting Python and importing the converter, about 1 s each)")
    traced = f", Python allocations in the main process (tracemalloc) {traced_peak / 2**20:.1f} MiB" if traced_peak else ""
    print(f"peak memory: main process RSS {self_rss:.0f} MiB, largest worker RSS {child_rss:.0f} MiB{traced}")


if __name__ == "__main__":
    main()
