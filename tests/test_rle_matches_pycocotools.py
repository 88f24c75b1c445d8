"""Context's mask RLE against the COCO API itself (pycocotools, a dev dependency used only here).

The converter keeps its own decoder because pycocotools checks nothing (see the last test); these
tests hold it to pycocotools' results on random masks, so the two cannot drift apart.
"""

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from pipeline.data.convert.context import decode_segmentation, rle_counts
from tests.fake_datasets import rle_encode


def random_masks():
    """Masks with short and long runs (counts of one to four 5-bit groups), set or clear first pixels, empty and full."""
    rng = np.random.default_rng(0)
    masks = [np.zeros((7, 9), bool), np.ones((7, 9), bool), np.eye(6, dtype=bool)]
    for height, width in [(4, 5), (30, 40), (61, 17), (375, 500)]:
        masks.append(rng.random((height, width)) < 0.5)  # runs of a few pixels
        blocky = np.zeros((height, width), bool)
        for _ in range(6):
            top, left = rng.integers(0, height), rng.integers(0, width)
            blocky[top:top + rng.integers(1, height), left:left + rng.integers(1, width)] ^= True
        masks.append(blocky)  # runs of hundreds to tens of thousands of pixels
    return masks


def coco_encode(mask: np.ndarray) -> dict:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))


@pytest.mark.parametrize("index", range(len(random_masks())))
def test_compressed_rle_decodes_and_encodes_as_the_coco_api(index):
    mask = random_masks()[index]
    height, width = mask.shape
    reference = coco_encode(mask)
    assert np.array_equal(decode_segmentation({"size": [height, width], "counts": reference["counts"].decode()},
                                              height, width), mask)
    assert rle_encode(mask) == {"size": [height, width], "counts": reference["counts"].decode()}
    assert np.array_equal(coco_mask.decode(reference).astype(bool), mask)


@pytest.mark.parametrize("index", range(len(random_masks())))
def test_uncompressed_counts_decode_as_the_coco_api(index):
    mask = random_masks()[index]
    height, width = mask.shape
    counts = rle_counts(coco_encode(mask)["counts"].decode())
    reference = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    assert np.array_equal(decode_segmentation({"size": [height, width], "counts": counts}, height, width),
                          coco_mask.decode(reference).astype(bool))


def test_the_coco_api_decodes_malformed_counts_without_an_error():
    # why the converter does not decode with pycocotools: counts that cover fewer pixels than the mask, or a
    # string cut short, decode without an error there (the rest of the mask is left as it was in memory)
    for truncated in ["", "211200", "2112002O0"]:
        coco_mask.decode({"size": [4, 5], "counts": truncated})  # no error
        with pytest.raises(ValueError, match="expected 20"):
            decode_segmentation({"size": [4, 5], "counts": truncated}, 4, 5)
