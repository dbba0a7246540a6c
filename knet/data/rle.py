"""COCO run-length encoding: the one decoder of its compressed ``counts`` strings.

The validator (strict: every malformed string is a problem naming the annotation) and the
metrics (the ground truth of PQ) both read RLE through :func:`rle_counts`.
"""

from __future__ import annotations

import numpy as np


def rle_counts(counts: str | bytes | list[int], strict: bool = False) -> np.ndarray:
    """Run lengths of a COCO RLE (alternating 0 / 1 runs in column-major order), int64.

    Compressed counts use COCO's text encoding (pycocotools' ``rleFrString``): each count is a
    little-endian series of 5-bit groups stored as ``chr(48 + group)``, bit 0x20 meaning "more
    groups follow", the last group's bit 0x10 the sign; from the fourth count on a count is
    stored as the difference to the count two places before it. A list is uncompressed.

    Args:
        strict: raise ValueError on a character outside the alphabet or a string that ends
            in the middle of a number (otherwise such a tail is ignored, as pycocotools does).
    """
    if isinstance(counts, list):
        return np.asarray(counts, dtype=np.int64)
    if isinstance(counts, str):
        if strict:
            for pos, char in enumerate(counts):
                if not 48 <= ord(char) < 112:
                    raise ValueError(f"character {char!r} at {pos} is not RLE")
        counts = counts.encode("ascii")
    chars = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if strict and chars.size and chars[-1] & 0x20:
        raise ValueError("string ends in the middle of a number")
    if chars.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero((chars & 0x20) == 0)  # the last group of each count
    if not ends.size:
        return np.zeros(0, dtype=np.int64)
    chars = chars[: ends[-1] + 1]
    starts = np.concatenate(([0], ends[:-1] + 1))
    token = np.repeat(np.arange(len(ends)), ends - starts + 1)
    shift = 5 * (np.arange(chars.size) - starts[token])
    values = np.add.reduceat((chars & 0x1F) << shift, starts)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * (ends - starts + 1)[negative])
    values[1::2] = np.cumsum(values[1::2])  # counts m > 2 are deltas to count m - 2
    values[2::2] = np.cumsum(values[2::2])
    return values


__all__ = ["rle_counts"]
