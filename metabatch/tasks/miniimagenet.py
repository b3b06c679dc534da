"""mini-ImageNet (Vinyals et al. 2016) in the split of Ravi & Larochelle (2017), as one class array.

`load` reads the common layout of the data set:

    root/
      images/*.jpg          # n0153282900000005.jpg, ...
      train.csv             # filename,label header, then one row per image
      val.csv
      test.csv

decodes the images of one split named in its csv, converts them to RGB,
resizes them (84x84 by default) and returns a `MiniImagenet`: a uint8
array `[num_classes, images_per_class, 3, size, size]` (600 images per class
in the official files: 64 train, 16 val, 20 test classes) plus the label
(WordNet id) of every class. `sampler` turns the array into an N-way
K-shot `sample_task` for `metabatch.task_loader`: it is
`metabatch.tasks.classification` followed by the per-channel ImageNet
normalisation that MAML-Pytorch (dragen1860) applies.

The resized array is cached as a uint8 `.npy` (plus a `.json` of class
names), one per split, size and filter, in the user cache folder
(`$METABATCH_CACHE/miniimagenet`, else `$XDG_CACHE_HOME/metabatch/miniimagenet`,
else `~/.cache/metabatch/miniimagenet`) or in the `cache_dir` you pass,
and read back memory-mapped (`metabatch.tasks.MmapArray`): loader workers
share it instead of copying it. Pillow decodes the JPEGs; it is needed only
to build a cache.

Cite: Vinyals et al. (2016), Matching networks for one shot learning, NeurIPS;
Ravi & Larochelle (2017), Optimization as a model for few-shot learning, ICLR.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import random as _random
from . import _cache, _common
from .classification import Classification, classification

__all__ = ["MEAN", "STD", "MiniImagenet", "Sampler", "load", "sampler"]

MEAN = (0.485, 0.456, 0.406)
"""ImageNet's per-channel (R, G, B) mean in `[0, 1]`: what `sampler` subtracts, as MAML-Pytorch does."""
STD = (0.229, 0.224, 0.225)
"""ImageNet's per-channel (R, G, B) standard deviation in `[0, 1]`: what `sampler` divides by."""

_CACHE_FORMAT = 1


class MiniImagenet(NamedTuple):
    """One split of mini-ImageNet as one class array.

    Attributes:
        images: uint8 `[num_classes, images_per_class, 3, size, size]` (RGB,
            channels first); classes in the order they first appear in the
            csv, images in csv order within a class.
        classes: the label of each class as written in the csv (a WordNet id
            such as `"n01532829"` in the official files).
    """

    images: np.ndarray
    classes: tuple


def _check_size(size) -> int | None:
    return _common.check_size(size, "the stored size")


def _check_split(split) -> str:
    if not isinstance(split, str) or not split or any(c in split for c in "/\\"):
        raise TypeError(f"split must be the name of a csv file without '.csv' ('train', 'val' or "
                        f"'test'), got {split!r}.")
    return split


def _read_csv(path: Path) -> tuple[list, list]:
    """`(classes in first-appearance order, [[filename, ...] per class])`."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
        got = rows[0] if rows else "nothing"
        raise ValueError(f"{path} must start with the header 'filename,label' (the Ravi & Larochelle "
                         f"layout), got {got!r}.")
    groups: dict = {}
    seen: dict = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"{path}, row {line}: expected 'filename,label', got {','.join(row)!r}.")
        name, label = row[0].strip(), row[1].strip()
        if name in seen:
            raise ValueError(f"{path}: {name} is listed twice (rows {seen[name]} and {line}); each image "
                             f"may appear once.")
        seen[name] = line
        groups.setdefault(label, []).append(name)
    if not groups:
        raise ValueError(f"{path} lists no images; add 'filename,label' rows.")
    return list(groups), list(groups.values())


def _decode(path: Path, size: int | None, resample: str) -> np.ndarray:
    """One image file -> uint8 `[3, H, W]` RGB, resized to `size x size`."""
    _common.pil("miniimagenet", "JPEG files")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.name} is listed in the csv but {path} does not exist; restore the "
                                f"image or remove its row from the csv.") from None
    return _common.rgb(data, size, resample, "miniimagenet", str(path),
                       "replace the file with a valid JPEG or remove its row from the csv")


def _read_split(root: Path, csv_path: Path, size: int | None, resample: str, new_sink) -> dict:
    """Decode the split's images into `new_sink((num_classes, per_class))`; returns the class names."""
    classes, files = _read_csv(csv_path)
    counts = [len(f) for f in files]
    common = max(set(counts), key=counts.count)
    odd = [(c, n) for c, n in zip(classes, counts, strict=True) if n != common]
    if odd:
        named = ", ".join(f"{c} has {n}" for c, n in odd[:5]) + (" ..." if len(odd) > 5 else "")
        raise ValueError(f"{csv_path}: every class needs the same number of images, but most have {common} "
                         f"and {named}; remove rows from, or add rows to, these {len(odd)} class(es).")
    folder = root / "images"
    paths = [folder / name for names in files for name in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        where = f"{folder} does not exist" if not folder.is_dir() else f"{missing[0]} does not exist"
        raise FileNotFoundError(f"{csv_path} lists {missing[0].name}, but {where} ({len(missing)} of the "
                                f"{len(paths)} listed images are missing); restore the images or remove "
                                f"their rows from the csv.")
    out = new_sink((len(classes), common))
    for path, rgb in zip(paths, _common.threaded_map(lambda p: _decode(p, size, resample), paths), strict=True):
        if out.item_shape is not None and rgb.shape != out.item_shape:
            first = out.item_shape
            raise ValueError(f"{path} is {rgb.shape[2]}x{rgb.shape[1]} but earlier images are "
                             f"{first[2]}x{first[1]}; pass size=... to resize them all.")
        out.append(rgb)
    return {"classes": list(classes)}


def _fingerprint(root: Path, csv_path: Path) -> str:
    """The csv's bytes and the size and time of every image it names."""
    h = hashlib.sha256(csv_path.read_bytes())
    _, files = _read_csv(csv_path)
    folder = root / "images"
    for names in files:
        for name in names:
            try:
                st = (folder / name).stat()
                h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{name}:missing\n".encode())
    return h.hexdigest()


# -- the cache ------------------------------------------------------------------------------------

def _from_cache(images: np.ndarray, info: dict) -> MiniImagenet | None:
    data = MiniImagenet(images, tuple(info["classes"]))
    size = info.get("size")
    fits = images.ndim == 5 and (size is None or images.shape[3:] == (size, size))
    return data if fits and len(images) == len(data.classes) else None


def load(root: str | os.PathLike, split: str, *, size: int | None = 84, resample: str = "bilinear",
         cache: bool = True, cache_dir: str | os.PathLike | None = None) -> MiniImagenet:
    """Read one split of mini-ImageNet from the Ravi & Larochelle layout.

    Every image named in `root/<split>.csv` is read from `root/images/`,
    converted to RGB and resized to `size x size` with Pillow's `resample`
    filter (bilinear by default, what `torchvision.transforms.Resize` and so
    MAML-Pytorch use). The first call decodes every image (about 2 ms each, on up
    to 8 threads; the training split holds 38 400) and caches the array; later calls map the
    cache. A cache is used only while it matches the request (same csv bytes,
    same size and time of every listed image, same size and filter); it is
    streamed to a temporary file (a build holds a few hundred images in
    memory, not the split) and renamed into place, and a damaged, stale or
    half-written cache is rebuilt, never trusted. With the cache on,
    `images` is a read-only `metabatch.tasks.MmapArray`: loader workers
    under any start method share it with the main process.

    Args:
        root: the folder holding `images/` and the csv files.
        split: `"train"`, `"val"` or `"test"` (any `<split>.csv` in
            `root` works).
        size: the output side in pixels; `None` keeps the stored size (all
            images must then have the same size).
        resample: `"bilinear"`, `"lanczos"`, `"box"`, `"bicubic"`,
            `"hamming"` or `"nearest"`.
        cache: read and write the cache; `False` always decodes, into memory.
        cache_dir: the folder of the cache (created if missing). `None`:
            `$METABATCH_CACHE/miniimagenet`, else
            `$XDG_CACHE_HOME/metabatch/miniimagenet`, else
            `~/.cache/metabatch/miniimagenet`; logged once (logger
            `metabatch.tasks`, level INFO). Nothing is written into
            `root` unless `cache_dir` points there; a cache that metabatch
            < 0.10 wrote next to the csv files
            (`<split>.<size>px-<resample>.npy`) is still read while it matches.

    Returns:
        A `MiniImagenet` `(images, classes)`.

    Raises:
        FileNotFoundError: `root` or `root/<split>.csv` does not exist, or
            an image named in the csv is missing from `root/images`.
        ValueError: a malformed csv (header, rows, a file listed twice),
            classes with different numbers of images (named), an image Pillow
            cannot read (named), a bad `size` or `resample`.
        TypeError: `split` or `size` of the wrong type.
        ImportError: Pillow is missing and there is no cache to read.
        OSError: `cache_dir` was given but cannot be written.

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> from metabatch.tasks import miniimagenet
        >>> with tempfile.TemporaryDirectory() as tmp:   # 2 classes x 3 images
        ...     root = pathlib.Path(tmp)
        ...     (root / "images").mkdir()
        ...     rows = ["filename,label"]
        ...     for label in ("n02110063", "n01532829"):
        ...         for i in range(3):
        ...             Image.new("RGB", (100, 90), (i, 0, 0)).save(root / "images" / f"{label}{i:08d}.jpg")
        ...             rows.append(f"{label}{i:08d}.jpg,{label}")
        ...     _ = (root / "train.csv").write_text("\\n".join(rows) + "\\n")
        ...     data = miniimagenet.load(root, "train", cache=False)
        >>> data.images.shape, data.images.dtype, data.classes
        ((2, 3, 3, 84, 84), dtype('uint8'), ('n02110063', 'n01532829'))
    """
    root = Path(root).expanduser()
    split, size, resample = _check_split(split), _check_size(size), _common.check_resample(resample)
    if not root.is_dir():
        raise FileNotFoundError(f"no mini-ImageNet folder at {root}; pass the folder that holds images/ "
                                f"and train.csv, val.csv, test.csv.")
    csv_path = root / f"{split}.csv"
    if not csv_path.is_file():
        found = sorted(p.stem for p in root.glob("*.csv"))
        have = f"it has {', '.join(f'{s}.csv' for s in found)}" if found else "it has no csv file"
        raise FileNotFoundError(f"no {split}.csv in {root} ({have}); mini-ImageNet needs the Ravi & "
                                f"Larochelle layout: images/*.jpg plus train.csv, val.csv and test.csv "
                                f"with a 'filename,label' header.")

    def build(new_sink):
        return _read_split(root, csv_path, size, resample, new_sink)

    if not cache:
        images, meta = _cache.collect(build)
        return MiniImagenet(images, tuple(meta["classes"]))
    tag = f"{split}.{size or 'full'}px-{resample}"
    request = {"format": _CACHE_FORMAT, "fingerprint": _fingerprint(root, csv_path),
               "source": str(csv_path.resolve()), "split": split, "size": size, "resample": resample}
    stem = _cache.stem(root, root.resolve().name or "root", tag, "miniimagenet", cache_dir)
    return _cache.cached(stem, request=request, build=build, decode=_from_cache, what="mini-ImageNet",
                         explicit=cache_dir is not None, legacy=root / tag)


# -- tasks ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A picklable N-way K-shot `sample_task` over RGB images; make one with `sampler`.

    Attributes:
        tasks: the `metabatch.tasks.Classification` that draws the tasks.
        mean: float32 `[C, 1, 1]` subtracted from every image in `[0, 1]`,
            or `None` (no normalisation).
        std: float32 `[C, 1, 1]` that the centred images are divided by, or `None`.
    """

    tasks: Classification
    mean: np.ndarray | None
    std: np.ndarray | None

    def __call__(self, key: _random.Key, idx: int, n_ctx: int, n_tgt: int) -> dict:
        """One task; see `sampler`.

        Examples:
            >>> import numpy as np, metabatch as mb
            >>> from metabatch.tasks import miniimagenet
            >>> sample_task = miniimagenet.sampler(np.zeros((4, 2, 3, 8, 8), np.uint8), ways=2)
            >>> x, y = sample_task(mb.random.key(0), 0, 1, 1)["context"]
            >>> x.shape, y.tolist(), round(float(x[0, 0, 0, 0]), 4)   # (0 - 0.485) / 0.229
            ((2, 3, 8, 8), [0, 1], -2.1179)
        """
        task = self.tasks(key, idx, n_ctx, n_tgt)
        if self.mean is not None:
            for part in ("context", "target"):
                x = task[part][0]
                x -= self.mean  # x is a fresh float32 array: normalise it in place
                x /= self.std
        return task


def sampler(images: MiniImagenet | np.ndarray, ways: int, *, normalize: bool | tuple = True,
            shuffle: bool = False, info: bool = False) -> Sampler:
    """N-way K-shot tasks over mini-ImageNet, normalised as MAML-Pytorch does.

    The task is that of `metabatch.tasks.classification` (`ways`
    distinct classes, labels `0 .. ways-1` in the order drawn, `n_ctx`
    support and `n_tgt` query images per class, rows grouped by label),
    then each image, scaled to `[0, 1]`, is normalised per channel:
    `(x - MEAN) / STD` with ImageNet's statistics, the
    `transforms.Normalize` of MAML-Pytorch's `MiniImagenet` dataset. No
    rotations: unlike Omniglot characters, a turned photo is not a new class.

    Args:
        images: a `MiniImagenet` from `load`, or its uint8
            `images` array `[num_classes, images_per_class, C, H, W]`.
        ways: classes per task (N).
        normalize: `True`: ImageNet's `MEAN` and `STD`;
            `False`: keep `[0, 1]`; or a pair `(mean, std)` of
            per-channel values.
        shuffle: shuffle the rows of the support and of the query set.
        info: also return `"info": {"classes": ..., "rotations": ...}`, the
            class indices behind labels `0 .. ways-1`.

    Returns:
        A `Sampler` `sample_task(key, idx, n_ctx, n_tgt) ->
        {"context": (x, y), "target": (x, y)}`: float32 `x` of shape
        `[ways * n_ctx, C, H, W]` (resp. `n_tgt`), int64 `y`.

    Raises:
        TypeError: `images` is not a uint8 array, or a bad `normalize`.
        ValueError: `images` is not `[classes, images, C, H, W]`, `ways`
            is out of range, or `normalize` does not give one value per channel.

    Examples:
        >>> import numpy as np, metabatch as mb
        >>> from metabatch.tasks import miniimagenet
        >>> images = np.full((10, 6, 3, 84, 84), 255, np.uint8)   # 10 classes x 6 white images
        >>> sample_task = miniimagenet.sampler(images, ways=5)
        >>> task = sample_task(mb.random.key(0), 0, n_ctx=1, n_tgt=5)
        >>> x, y = task["target"]
        >>> x.shape, x.dtype, y.tolist()[:7]
        ((25, 3, 84, 84), dtype('float32'), [0, 0, 0, 0, 0, 1, 1])
        >>> [round(float(x[0, c, 0, 0]), 4) for c in range(3)]   # (1 - MEAN) / STD
        [2.2489, 2.4286, 2.64]
    """
    array = images.images if isinstance(images, MiniImagenet) else images
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        what = f"a {array.dtype} array" if isinstance(array, np.ndarray) else type(array).__name__
        raise TypeError(f"sampler(): images must be the uint8 array (or the MiniImagenet) that load() "
                        f"returns, got {what}; for other data use metabatch.tasks.classification.")
    if array.ndim != 5:
        raise ValueError(f"sampler(): images must have shape [num_classes, images_per_class, C, H, W], got "
                         f"{array.shape}.")
    mean, std = _common.normalization(normalize, (MEAN, STD), array.shape[2], "sampler")
    tasks = classification(array, ways, shuffle=shuffle, info=info)
    return Sampler(tasks, mean, std)
