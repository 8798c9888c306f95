"""The Pascal VOC colour map shared by the VOC reader, the synthetic exporter and the figures."""

from __future__ import annotations

import numpy as np


def voc_palette() -> np.ndarray:
    """The Pascal VOC colour map, (256, 3) uint8.

    Colour of index i: the bits of i are dealt out, three at a time, to the red, green and blue channels
    starting from the most significant bit: for j = 0..7, bit 3j of i -> bit 7-j of R, bit 3j+1 -> bit 7-j
    of G, bit 3j+2 -> bit 7-j of B. So 1 = (128, 0, 0), 15 = (192, 128, 128), 255 = (224, 224, 192).
    """
    index = np.arange(256, dtype=np.int64)
    palette = np.zeros((256, 3), dtype=np.int64)
    for j in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * j + channel)) & 1) << (7 - j)
    return palette.astype(np.uint8)
