"""Images as tensors: decoding to the model's input size, and the uint8 <-> [0, 1] float convention.

Splits held in memory are uint8 (a quarter of float32's size); every consumer converts a batch at a
time with :func:`as_pixels`, which gives exactly the floats :func:`to_tensor` makes.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _resized(image: Image.Image, size: int) -> np.ndarray:
    """RGB, shorter side to ``size`` (bicubic), centre crop to ``size``^2: a uint8 (3, H, W) view."""
    image = image.convert("RGB")
    width, height = image.size
    if min(width, height) != size:  # same rounding as torchvision's Resize(int)
        short, long = sorted((width, height))
        new_long = int(size * long / short)
        new = (size, new_long) if width <= height else (new_long, size)
        image = image.resize(new, Image.Resampling.BICUBIC)
        width, height = image.size
    if (width, height) != (size, size):
        left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """The resized, centre-cropped image as uint8 (3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(_resized(image, size)))


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """The resized, centre-cropped image as float32 (3, H, W) in [0, 1] (= ``as_pixels(to_uint8(...))``)."""
    array = _resized(image, size)
    out = np.empty(array.shape, dtype=np.float32)
    np.divide(array, np.float32(255.0), out=out)  # numpy, not torch: no thread-pool cost per image
    return torch.from_numpy(out)


def as_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images as float pixels in [0, 1]: uint8 divided by 255 (exactly the floats of :func:`to_tensor`);
    float input is returned as is. A lazily read array (:class:`pipeline.data.read.LazyImages`) is read first."""
    if not isinstance(x, torch.Tensor):
        x = x.load()
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x
