"""Helpers the dataset readers and task families share (private, shared on purpose).

Argument checks of the readers (`size`, `resample`), Pillow's import and image
decoding with errors that name the file, uint8 -> float32 conversion, the
per-channel normalisation of the ImageNet readers, and a thread map that
keeps a bounded number of decoded images in flight.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import operator
import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np

RESAMPLE = ("lanczos", "box", "bilinear", "bicubic", "hamming", "nearest")


def pil(reader: str, files: str):
    """`PIL.Image`, or an ImportError saying that `reader` needs Pillow to decode `files`."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(f"metabatch.tasks.{reader} needs Pillow to decode the {files}: pip install pillow "
                          f"(or pip install 'metabatch[omniglot]'). Arrays already cached as .npy load "
                          f"without it.") from err
    return Image


def check_size(size, keep: str) -> int | None:
    """`size` as an int >= 1, or `None`; `keep` says what `None` means."""
    if size is None:
        return None
    if isinstance(size, (bool, np.bool_)):
        raise TypeError(f"size must be an int or None (keep {keep}), got {size!r}.")
    try:
        size = operator.index(size)
    except TypeError:
        raise TypeError(f"size must be an int or None (keep {keep}), got {size!r}.") from None
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}.")
    return size


def check_resample(resample) -> str:
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {', '.join(map(repr, RESAMPLE))}, got {resample!r}.")
    return resample


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 [0, 1]; bool -> 0/1; floats -> float32 (always a new array)."""
    out = images.astype(np.float32)
    if images.dtype == np.uint8:
        out /= np.float32(255)
    return out


def item_shape(shape: tuple, channel_dim: bool) -> tuple:
    return (1,) + shape if channel_dim and len(shape) == 2 else shape


def rgb(data: bytes, size: int | None, resample: str, reader: str, where: str, fix: str) -> np.ndarray:
    """One encoded image -> uint8 `[3, H, W]` RGB resized to `size x size`; errors name `where`."""
    Image = pil(reader, "images")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), getattr(Image.Resampling, resample.upper()))
            out = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read the image {where} ({type(err).__name__}: {err}); {fix}.") from None
    return out.transpose(2, 0, 1)


def resize_rgb(image: np.ndarray, size: int | None, resample: str, reader: str) -> np.ndarray:
    """uint8 `[3, H, W]` -> `[3, size, size]` with Pillow's filter (unchanged when already that size)."""
    if size is None or image.shape[1:] == (size, size):
        return image
    Image = pil(reader, "images")
    im = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    out = np.asarray(im.resize((size, size), getattr(Image.Resampling, resample.upper())), dtype=np.uint8)
    return out.transpose(2, 0, 1)


def threaded_map(fn: Callable, items: Iterable, *, workers: int | None = None, ahead: int = 64) -> Iterator:
    """`map(fn, items)` on up to 8 threads (Pillow decodes without the GIL), in order.

    At most `ahead` results are in flight or waiting, so decoding a data set
    of any size holds only that many decoded images at once.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def channel_stats(values, name: str, channels: int, fn: str) -> np.ndarray:
    try:
        out = np.asarray(values, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}(): {name} must be {channels} numbers, got {values!r}.") from None
    if out.shape != (channels,) or not np.all(np.isfinite(out)):
        raise ValueError(f"{fn}(): {name} must be {channels} finite numbers (one per channel of the "
                         f"images), got {values!r}; pass normalize=(mean, std) with {channels} values each, "
                         f"or normalize=False.")
    return out.reshape(channels, 1, 1)


def normalization(normalize, default: tuple, channels: int, fn: str) -> tuple:
    """`(mean, std)` float32 `[C, 1, 1]` arrays, or `(None, None)` for `normalize=False`."""
    if normalize is True:
        normalize = default
    if normalize is False:
        return None, None
    if isinstance(normalize, tuple) and len(normalize) == 2:
        mean, std = (channel_stats(v, n, channels, fn) for v, n in zip(normalize, ("mean", "std"), strict=True))
        if np.any(std == 0):
            raise ValueError(f"{fn}(): std must not contain 0, got {normalize[1]!r}.")
        return mean, std
    raise TypeError(f"{fn}(): normalize must be True (ImageNet MEAN/STD), False or a pair "
                    f"(mean, std), got {normalize!r}.")
