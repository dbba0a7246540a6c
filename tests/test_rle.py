"""The one COCO RLE decoder (knet.data.rle) against pycocotools, lenient and strict."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from knet.data.rle import rle_counts


@pytest.mark.parametrize("seed", range(5))
def test_compressed_counts_decode_as_pycocotools_encodes(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        mask = (rng.random((h, w)) > rng.random()).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(mask))
        for strict in (False, True):
            counts = rle_counts(rle["counts"].decode("ascii"), strict=strict)
            assert counts.sum() == h * w
            back = mask_utils.frPyObjects({"size": [h, w], "counts": counts.tolist()}, h, w)
            assert np.array_equal(mask_utils.decode(back), mask)
    assert rle_counts([3, 4, 5]).tolist() == [3, 4, 5]  # uncompressed


@pytest.mark.parametrize(
    ("counts", "message"),
    [("a~", r"character '~' at 1 is not RLE"), ("PP", "ends in the middle of a number")],
)
def test_strict_decoding_names_the_problem(counts, message):
    with pytest.raises(ValueError, match=message):
        rle_counts(counts, strict=True)
    rle_counts("PP")  # lenient (the metrics' ground truth, already validated): no error
