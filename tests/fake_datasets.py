"""Tiny stand-ins for the official dataset archives, with their real folder layouts and file formats.

Every builder writes real files (JPEG images, palette/grayscale PNGs, MATLAB .mat structs, the
PASCAL in Detail JSON) into real archives (.tar, .tgz, .zip) and returns what the tests need to
check the conversion: the raw label arrays by id and the expected split lists.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (bit-interleaved), 256 RGB triples flattened."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def jpeg_bytes(height: int, width: int, seed: int, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def palette_png_bytes(label: np.ndarray) -> bytes:
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def gray_png_bytes(label: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(label.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def sbd_mat_bytes(segmentation: np.ndarray) -> bytes:
    """An SBD cls/<id>.mat: struct GTcls with Boundaries (cell of sparse), Segmentation, CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)
    for i in range(20):
        boundaries[i, 0] = scipy.sparse.csc_matrix(segmentation.shape, dtype=bool)
    present = np.array([[c] for c in np.unique(segmentation) if 0 < c < 255], dtype=np.uint8)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"GTcls": {"Boundaries": boundaries, "Segmentation": segmentation.astype(np.uint8),
                                        "CategoriesPresent": present}})
    return buffer.getvalue()


def rle_encode(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of a binary mask [H, W] (the inverse of
    pipeline.data.convert.context.decode_segmentation), to write the fake annotations."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    chars = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5
            more = value != -1 if chunk & 0x10 else value != 0
            if more:
                chunk |= 0x20
            chars.append(chr(chunk + 48))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def random_label(rng: np.random.Generator, height: int, width: int, values: list[int]) -> np.ndarray:
    return rng.choice(np.array(values), size=(height, width)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# PASCAL VOC 2012 + SBD
# --------------------------------------------------------------------------------------------
@dataclass
class FakeVoc:
    folder: Path
    voc_tar: Path
    sbd_tgz: Path
    voc_train: list[str]
    voc_val: list[str]
    sbd_train: list[str]
    sbd_val: list[str]
    voc_labels: dict[str, np.ndarray] = field(default_factory=dict)  # raw SegmentationClass values
    sbd_labels: dict[str, np.ndarray] = field(default_factory=dict)  # raw GTcls.Segmentation values
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # (height, width)

    @property
    def train_ids(self) -> list[str]:
        return sorted((set(self.voc_train) | set(self.sbd_train) | set(self.sbd_val)) - set(self.voc_val))


def make_voc(folder: Path, *, corrupt: dict[str, str] | None = None) -> FakeVoc:
    """VOCtrainval_11-May-2012.tar and benchmark.tgz in `folder`.

    `corrupt` = {id: what} damages files: "image" truncates the JPEG, "label_value" writes the
    class value 42 into the label, "size" makes the label smaller than the image, "no_image"
    leaves the JPEG out.
    """
    corrupt = corrupt or {}
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    fake = FakeVoc(folder, folder / "VOCtrainval_11-May-2012.tar", folder / "benchmark.tgz",
                   voc_train=["2007_000032", "2007_000039", "2008_000002"],
                   voc_val=["2007_000033", "2007_000042"],
                   sbd_train=["2007_000039", "2008_000003", "2007_000033"],  # 000039 also in VOC train, 000033 in VOC val
                   sbd_val=["2008_000008", "2009_000001"])
    all_ids = sorted(set(fake.voc_train + fake.voc_val + fake.sbd_train + fake.sbd_val))
    for i, image_id in enumerate(all_ids):
        fake.sizes[image_id] = (24 + 2 * i, 32 + 3 * i)
    voc_values = [0, 1, 5, 15, 20, 255]
    with tarfile.open(fake.voc_tar, "w") as tar:
        base = "VOCdevkit/VOC2012"
        for d in ("VOCdevkit", base, f"{base}/JPEGImages", f"{base}/SegmentationClass", f"{base}/ImageSets",
                  f"{base}/ImageSets/Segmentation", f"{base}/Annotations"):
            add_dir(tar, d)
        for i, image_id in enumerate(all_ids):
            h, w = fake.sizes[image_id]
            data = jpeg_bytes(h, w, seed=i)
            if corrupt.get(image_id) == "image":
                data = data[: len(data) // 2]
            if corrupt.get(image_id) != "no_image":
                add_bytes(tar, f"{base}/JPEGImages/{image_id}.jpg", data)
            add_bytes(tar, f"{base}/Annotations/{image_id}.xml", b"<annotation/>")
        for image_id in fake.voc_train + fake.voc_val:
            h, w = fake.sizes[image_id]
            label = random_label(rng, h, w, voc_values)
            label[0, 0], label[0, 1], label[0, 2], label[0, 3] = 0, 1, 20, 255  # known pixels
            if corrupt.get(image_id) == "label_value":
                label[1, 1] = 42
            if corrupt.get(image_id) == "size":
                label = label[:-2]
            fake.voc_labels[image_id] = label
            add_bytes(tar, f"{base}/SegmentationClass/{image_id}.png", palette_png_bytes(label))
        lists = f"{base}/ImageSets/Segmentation"
        add_bytes(tar, f"{lists}/train.txt", "".join(f"{i}\n" for i in fake.voc_train).encode())
        add_bytes(tar, f"{lists}/val.txt", "".join(f"{i}\n" for i in fake.voc_val).encode())
        add_bytes(tar, f"{lists}/trainval.txt", "".join(f"{i}\n" for i in sorted(fake.voc_train + fake.voc_val)).encode())
    with tarfile.open(fake.sbd_tgz, "w:gz") as tar:
        base = "benchmark_RELEASE/dataset"
        for d in ("benchmark_RELEASE", base, f"{base}/cls", f"{base}/img", f"{base}/inst"):
            add_dir(tar, d)
        for image_id in sorted(set(fake.sbd_train + fake.sbd_val)):
            h, w = fake.sizes[image_id]
            label = random_label(rng, h, w, [0, 1, 7, 16, 20])
            label[0, 0], label[0, 1], label[0, 2] = 0, 1, 16
            if corrupt.get(image_id) == "label_value" and image_id not in fake.voc_labels:
                label[1, 1] = 21
            fake.sbd_labels[image_id] = label
            add_bytes(tar, f"{base}/cls/{image_id}.mat", sbd_mat_bytes(label))
            add_bytes(tar, f"{base}/img/{image_id}.jpg", jpeg_bytes(h, w, seed=99))
        add_bytes(tar, f"{base}/train.txt", "".join(f"{i}\n" for i in fake.sbd_train).encode())
        add_bytes(tar, f"{base}/val.txt", "".join(f"{i}\n" for i in fake.sbd_val).encode())
    return fake


# --------------------------------------------------------------------------------------------
# COCO-Stuff 164k
# --------------------------------------------------------------------------------------------
@dataclass
class FakeCoco:
    folder: Path
    ids: dict[str, list[str]]  # split -> image ids
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # raw stuffthingmaps values


COCO_USED_VALUES = [0, 10, 12, 24, 26, 89, 91, 150, 181, 255]  # raw values that are classes (or ignore)


def make_coco(folder: Path, *, bad_values: dict[str, int] | None = None, unpaired_label: str | None = None) -> FakeCoco:
    """train2017.zip, val2017.zip and stuffthingmaps_trainval2017.zip in `folder`."""
    bad_values = bad_values or {}
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    fake = FakeCoco(folder, {"train": ["000000000009", "000000000025", "000000000030"],
                             "val": ["000000000139", "000000000285"]})
    with zipfile.ZipFile(folder / "stuffthingmaps_trainval2017.zip", "w") as labels_zip:
        for split, ids in fake.ids.items():
            labels_zip.writestr(f"{split}2017/", b"")
            with zipfile.ZipFile(folder / f"{split}2017.zip", "w") as images_zip:
                images_zip.writestr(f"{split}2017/", b"")
                for i, image_id in enumerate(ids):
                    h, w = 20 + i, 30 + 2 * i
                    images_zip.writestr(f"{split}2017/{image_id}.jpg", jpeg_bytes(h, w, seed=i))
                    label = random_label(rng, h, w, COCO_USED_VALUES)
                    label[0, :6] = [0, 10, 12, 91, 181, 255]  # known pixels
                    if image_id in bad_values:
                        label[2, 2] = bad_values[image_id]
                    fake.labels[image_id] = label
                    labels_zip.writestr(f"{split}2017/{image_id}.png", gray_png_bytes(label))
        if unpaired_label:
            labels_zip.writestr(f"train2017/{unpaired_label}.png", gray_png_bytes(np.zeros((4, 4))))
    return fake


# --------------------------------------------------------------------------------------------
# PASCAL Context (VOC2010 + trainval_merged.json)
# --------------------------------------------------------------------------------------------
CONTEXT_CATEGORIES = [  # (category_id, name): a few of the 59, and others that the 59 ignore
    (2, "aeroplane"), (9, "bag"), (25, "bird"), (65, "cat"), (98, "cow"), (284, "person"),
    (360, "sky"), (458, "wood"), (1, "accordion"), (3, "air conditioner"), (300, "pole"),
]


@dataclass
class FakeContext:
    folder: Path
    phases: dict[str, str]  # file stem -> phase
    expected_full: dict[str, np.ndarray] = field(default_factory=dict)  # full-label-id map per image


def make_context(folder: Path, *, polygon: bool = False, undefined_category: bool = False) -> FakeContext:
    """VOCtrainval_03-May-2010.tar and trainval_merged.json in `folder` (images of phase train, val, test)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    stems = {"2008_000002": "train", "2008_000003": "val", "2008_000007": "train", "2010_000001": "val",
             "2010_000002": "test"}
    fake = FakeContext(folder, stems)
    images, annotations = [], []
    with tarfile.open(folder / "VOCtrainval_03-May-2010.tar", "w") as tar:
        for d in ("VOCdevkit", "VOCdevkit/VOC2010", "VOCdevkit/VOC2010/JPEGImages"):
            add_dir(tar, d)
        for n, (stem, phase) in enumerate(stems.items()):
            h, w = 18 + n, 26 + n
            add_bytes(tar, f"VOCdevkit/VOC2010/JPEGImages/{stem}.jpg", jpeg_bytes(h, w, seed=n))
            image_id = int(stem[:4] + stem[5:])
            images.append({"image_id": image_id, "file_name": f"{stem}.jpg", "height": h, "width": w,
                           "phase": phase, "date_captured": "2010-01-01"})
            full = np.zeros((h, w), dtype=np.int64)
            for k in range(4):  # overlapping rectangles: later annotations are painted on top
                category = CONTEXT_CATEGORIES[int(rng.integers(len(CONTEXT_CATEGORIES)))][0]
                if undefined_category and stem == "2008_000007" and k == 0:
                    category = 457  # not among the file's categories
                y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
                mask = np.zeros((h, w), dtype=bool)
                mask[y0 : y0 + h // 2 + 2, x0 : x0 + w // 2 + 3] = True
                if polygon and k == 0:
                    y1, x1 = y0 + h // 2 + 2, x0 + w // 2 + 3
                    segmentation = [[x0, y0, x1, y0, x1, y1, x0, y1]]  # pixel-edge rectangle == the mask
                else:
                    segmentation = rle_encode(mask)
                full[mask] = category
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                    "segmentation": segmentation, "area": int(mask.sum()),
                                    "bbox": [x0, y0, w // 2 + 3, h // 2 + 2], "iscrowd": 0, "parts": []})
            fake.expected_full[stem] = full
    data = {
        "info": {"description": "fake PASCAL in Detail"},
        "images": images,
        "annos_segmentation": annotations,
        "annos_occlusion": [],
        "annos_joints": [],
        "categories": [{"category_id": cid, "name": name, "supercategory": "object", "onlysemantic": 0, "parts": []}
                       for cid, name in CONTEXT_CATEGORIES],
        "parts": [],
    }
    (folder / "trainval_merged.json").write_text(json.dumps(data))
    return fake
