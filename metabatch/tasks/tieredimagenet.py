"""tiered-ImageNet (Ren et al. 2018) as one flat image array with a label per image.

tiered-ImageNet is a larger few-shot subset of ILSVRC-12: 608 classes
(779 165 images) grouped into 34 high-level categories, split by category
into 20 training (351 classes), 6 validation (97) and 8 test (160)
categories, so that test classes are far from the training ones. Classes
have different sizes (732 to 1 300 images), so `load` returns a flat array
`[num_images, 3, size, size]` plus the class label of every image, and
`sampler` draws N-way K-shot tasks over it (`metabatch.tasks.classification`
with `labels=`, then the ImageNet normalisation of
`metabatch.tasks.miniimagenet.sampler`).

`load` reads the two common layouts (for one `split`, `"train"`,
`"val"` or `"test"`), looked for in this order:

1. class folders, as tiered-imagenet-tools (Liu et al.) writes them:

       root/train/n01530575/*.jpg    # one folder per class (WordNet id), JPEG or PNG files
       root/val/...   root/test/...

2. the per-split files of Ren et al.'s release, as most few-shot code reads them:

       root/train_labels.pkl         # {"label_specific": int [N], "label_general": int [N],
                                     #  "label_specific_str": [class names], "label_general_str": [...]}
       root/train_images.npz         # "images": uint8 [N, 84, 84, 3] in OpenCV's BGR order, or
       root/train_images_png.pkl     # a list of N PNG-encoded images (uint8 arrays)

   These pickles are read with an allowlist that resolves only numpy's
   array constructors: a file that asks for anything else (which could run
   code) is refused, never executed.

The decoded, resized images are cached as a uint8 `.npy` in the user cache
folder (`$METABATCH_CACHE/tieredimagenet`, else
`$XDG_CACHE_HOME/metabatch/tieredimagenet`, else
`~/.cache/metabatch/tieredimagenet`) or in `cache_dir`, built in a
streaming pass (a few hundred images in memory at a time, never the split:
the training split is 9.5 GB at 84x84), and mapped back read-only as a
`metabatch.tasks.MmapArray` that every loader worker shares.

Cite: Ren et al. (2018), Meta-learning for semi-supervised few-shot
classification, ICLR.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import _cache, _common, _pickles
from .classification import classification
from .miniimagenet import MEAN, STD, Sampler

__all__ = ["TieredImagenet", "load", "sampler"]

_CACHE_FORMAT = 1
_EXTENSIONS = (".jpg", ".jpeg", ".png")


class TieredImagenet(NamedTuple):
    """One split of tiered-ImageNet as a flat image array.

    Attributes:
        images: uint8 `[num_images, 3, size, size]` (RGB, channels first),
            grouped by class in class order (class folders) or in file order
            (pickle files).
        labels: int64 `[num_images]`: the index into `classes` of each image.
        classes: the name of each class: its folder name (a WordNet id), or
            `label_specific_str` of the pickle files.
        categories: the high-level category of each class (from
            `label_general_str`), or `None` for class folders, which do not say.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple
    categories: tuple | None


def _check_split(split) -> str:
    if not isinstance(split, str) or not split or any(c in split for c in "/\\"):
        raise TypeError(f"split must be 'train', 'val' or 'test' (a folder or file prefix in root), "
                        f"got {split!r}.")
    return split


def _layout(root: Path, split: str) -> tuple[str, Path]:
    folder = root / split
    if folder.is_dir():
        return "folders", folder
    labels = root / f"{split}_labels.pkl"
    npz, png = root / f"{split}_images.npz", root / f"{split}_images_png.pkl"
    if labels.is_file() and npz.is_file():
        return "npz", npz
    if labels.is_file() and png.is_file():
        return "png", png
    there = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))[:12]
    raise FileNotFoundError(
        f"no tiered-ImageNet split {split!r} in {root}: expected a class folder {folder}/<class>/*.jpg, or "
        f"{labels.name} beside {npz.name} or {png.name} (Ren et al.'s files); the folder holds "
        f"{', '.join(there) if there else 'nothing'}.")


# -- class folders ----------------------------------------------------------------------------------

def _folder_files(folder: Path) -> tuple[list, list]:
    """`(class names, [[image paths] per class])`, both sorted."""
    classes, files = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in sub.iterdir() if p.suffix.lower() in _EXTENSIONS and not p.name.startswith("."))
        if not images:
            raise ValueError(f"{sub} holds no image ({', '.join(_EXTENSIONS)}); remove the folder or add its "
                             f"images.")
        classes.append(sub.name)
        files.append(images)
    if not classes:
        raise ValueError(f"{folder} holds no class folder; tiered-ImageNet's folder layout is "
                         f"{folder}/<class>/*.jpg.")
    return classes, files


def _read_folders(folder: Path, size, resample, new_sink) -> dict:
    classes, files = _folder_files(folder)
    paths = [p for group in files for p in group]
    out = new_sink((len(paths),))

    def decode(path):
        return _common.rgb(path.read_bytes(), size, resample, "tieredimagenet", str(path),
                           "replace or remove that file")

    for path, rgb in zip(paths, _common.threaded_map(decode, paths), strict=True):
        if out.item_shape is not None and rgb.shape != out.item_shape:
            first = out.item_shape
            raise ValueError(f"{path} is {rgb.shape[2]}x{rgb.shape[1]} but earlier images are "
                             f"{first[2]}x{first[1]}; pass size=... to resize them all.")
        out.append(rgb)
    return {"classes": classes, "categories": None, "runs": [[c, len(g)] for c, g in enumerate(files)]}


# -- Ren et al.'s files ------------------------------------------------------------------------------

def _labels(path: Path) -> tuple[np.ndarray, list, list | None]:
    """`(label per image, class names, category of each class or None)` from `<split>_labels.pkl`."""
    data = _pickles.load(path)
    if isinstance(data, dict):
        data = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in data.items()}
    if not isinstance(data, dict) or "label_specific" not in data:
        raise ValueError(f"{path} must hold a dict with 'label_specific' (the class of each image) and "
                         f"'label_specific_str' (class names), as Ren et al.'s files do; got "
                         f"{type(data).__name__} {sorted(data) if isinstance(data, dict) else ''}.")
    labels = np.asarray(data["label_specific"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError(f"{path}: label_specific must be non-negative ints [num_images], got "
                         f"{labels.dtype} {labels.shape}.")
    labels = labels.astype(np.int64)
    count = int(labels.max()) + 1 if labels.size else 0
    names = data.get("label_specific_str")
    names = [str(n) for n in names] if names is not None else [str(c) for c in range(count)]
    if len(names) < count:
        raise ValueError(f"{path}: label_specific goes up to {count - 1} but label_specific_str names only "
                         f"{len(names)} classes.")
    categories = None
    general, general_str = data.get("label_general"), data.get("label_general_str")
    if general is not None and general_str is not None:
        general = np.asarray(general)
        if general.shape == labels.shape:
            first: dict[int, object] = {}
            for c, g in zip(labels.tolist(), general.tolist(), strict=True):
                first.setdefault(c, g)
            categories = [str(general_str[first[c]]) if c in first else "" for c in range(len(names))]
    return labels, names, categories


def _runs(labels: np.ndarray) -> list:
    """Run-length code `[[label, count], ...]` (short for the class-grouped files)."""
    if not labels.size:
        return []
    cuts = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], cuts])
    counts = np.diff(np.concatenate([starts, [labels.size]]))
    return [[int(labels[s]), int(n)] for s, n in zip(starts, counts, strict=True)]


def _read_npz(path: Path, n: int, size, resample, new_sink) -> None:
    """Stream `images` (uint8 `[N, H, W, 3]`, BGR) out of the npz into the sink as RGB `[3, size, size]`."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a valid .npz file ({err}); it may be truncated: fetch or "
                         f"decompress it again.") from None
    with archive:
        member = "images.npy"
        if member not in archive.namelist():
            raise ValueError(f"{path} has no 'images' array (it holds {archive.namelist()}); Ren et al.'s "
                             f"files store uint8 [N, 84, 84, 3] images under that name.")
        try:
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                if (len(shape) != 4 or shape[3] != 3 or dtype != np.uint8 or fortran):
                    raise ValueError(f"{path}: images must be C-ordered uint8 [N, H, W, 3], got {dtype} "
                                     f"{shape}{' (Fortran order)' if fortran else ''}.")
                if shape[0] != n:
                    raise ValueError(f"{path} holds {shape[0]} images but its labels file has {n} labels; "
                                     f"the two files must come from the same split.")
                out = new_sink((n,))
                per = int(np.prod(shape[1:]))
                step = max(1, (_cache.CHUNK_BYTES // 4) // per)
                for start in range(0, n, step):
                    k = min(step, n - start)
                    chunk = f.read(k * per)
                    if len(chunk) != k * per:
                        raise ValueError(f"{path} is truncated: images {start}..{start + k - 1} are missing.")
                    bgr = np.frombuffer(chunk, np.uint8).reshape((k,) + tuple(shape[1:]))
                    for image in bgr:
                        rgb = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))
                        out.append(_common.resize_rgb(rgb, size, resample, "tieredimagenet"))
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise ValueError(f"{path}: cannot read its images ({type(err).__name__}: {err}); the file is "
                             f"damaged: fetch or decompress it again.") from None


def _read_png_pickle(path: Path, n: int, size, resample, new_sink) -> None:
    out = new_sink((n,))
    arrays = _pickles.stream_arrays(path)

    def decode(item):
        i, encoded = item
        return _common.rgb(np.ascontiguousarray(encoded).tobytes(), size, resample, "tieredimagenet",
                           f"number {i} in {path}", "the file is damaged: fetch it again")

    count = 0
    try:
        for rgb in _common.threaded_map(decode, enumerate(arrays)):
            if count >= n:
                raise ValueError(f"{path} holds more images than its labels file has labels ({n}); the two "
                                 f"files must come from the same split.")
            if out.item_shape is not None and rgb.shape != out.item_shape:
                raise ValueError(f"{path}: image number {count} is {rgb.shape[2]}x{rgb.shape[1]} but earlier "
                                 f"ones are {out.item_shape[2]}x{out.item_shape[1]}; pass size=... to resize "
                                 f"them all.")
            out.append(rgb)
            count += 1
    finally:
        arrays.close()
    if count != n:
        raise ValueError(f"{path} holds {count} images but its labels file has {n} labels; the two files "
                         f"must come from the same split.")


def _read_files(root: Path, split: str, layout: str, path: Path, size, resample, new_sink) -> dict:
    labels, names, categories = _labels(root / f"{split}_labels.pkl")
    reader = _read_npz if layout == "npz" else _read_png_pickle
    reader(path, len(labels), size, resample, new_sink)
    return {"classes": names, "categories": categories, "runs": _runs(labels)}


# -- load -----------------------------------------------------------------------------------------

def _fingerprint(root: Path, split: str, layout: str, path: Path) -> str:
    h = hashlib.sha256(layout.encode())
    if layout == "folders":
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            for p in sorted(sub.iterdir()):
                st = p.stat()
                h.update(f"{sub.name}/{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        for p in (root / f"{split}_labels.pkl", path):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _data(images: np.ndarray, meta: dict) -> TieredImagenet | None:
    runs = meta["runs"]
    labels = (np.repeat(np.array([r[0] for r in runs], np.int64), np.array([r[1] for r in runs], np.int64))
              if runs else np.zeros(0, np.int64))
    size = meta.get("size")
    if images.ndim != 4 or len(labels) != len(images) or (size is not None and images.shape[2:] != (size, size)):
        return None
    if labels.size and labels.max() >= len(meta["classes"]):
        return None
    categories = tuple(meta["categories"]) if meta.get("categories") is not None else None
    return TieredImagenet(images, labels, tuple(meta["classes"]), categories)


def load(root: str | os.PathLike, split: str, *, size: int | None = 84, resample: str = "bilinear",
         cache: bool = True, cache_dir: str | os.PathLike | None = None) -> TieredImagenet:
    """Read one split of tiered-ImageNet from class folders or Ren et al.'s files.

    Images are converted to RGB and resized to `size x size` with Pillow's
    `resample` filter (the pickled images are 84x84 already and are left
    as they are at `size=84`). The first call decodes every image of the
    split (448 695 in the training split: expect tens of minutes on 2 cores)
    and caches them; later calls check the source (a `stat` of every image
    of class folders: seconds for the training split; two files otherwise)
    and map the cache. A cache is used only while it matches the request:
    same files (names, sizes and times of the images, or of the pickle / npz
    files), same size and filter.

    Args:
        root: the folder holding `<split>/<class>/*.jpg` or
            `<split>_labels.pkl` with `<split>_images.npz` or
            `<split>_images_png.pkl`.
        split: `"train"`, `"val"` or `"test"`.
        size: the output side in pixels; `None` keeps the stored size (all
            images must then have the same size).
        resample: `"bilinear"`, `"lanczos"`, `"box"`, `"bicubic"`,
            `"hamming"` or `"nearest"`.
        cache: read and write the cache; `False` decodes into memory (the
            whole split: 9.5 GB for the training split at 84x84).
        cache_dir: the folder of the cache (created if missing). `None`:
            `$METABATCH_CACHE/tieredimagenet`, else
            `$XDG_CACHE_HOME/metabatch/tieredimagenet`, else
            `~/.cache/metabatch/tieredimagenet`; logged once (logger
            `metabatch.tasks`, level INFO).

    Returns:
        A `TieredImagenet` `(images, labels, classes, categories)`.

    Raises:
        FileNotFoundError: `root` holds neither layout for `split`.
        ValueError: an empty class folder, an image Pillow cannot read
            (named), pickle / npz files that disagree on the number of images
            or are damaged, images of different sizes with `size=None`, a
            bad `size` or `resample`.
        pickle.UnpicklingError: a pickle file asks for anything but numpy
            arrays and plain containers (it is refused, not run).
        TypeError: `split` or `size` of the wrong type.
        ImportError: Pillow is missing and there is no cache to read.
        OSError: `cache_dir` was given but cannot be written.

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> from metabatch.tasks import tieredimagenet
        >>> with tempfile.TemporaryDirectory() as tmp:   # 2 classes of 3 and 2 images
        ...     for wnid, n in (("n01530575", 3), ("n01531178", 2)):
        ...         folder = pathlib.Path(tmp, "tiered", "train", wnid)
        ...         folder.mkdir(parents=True)
        ...         for i in range(n):
        ...             Image.new("RGB", (90, 90), (i, 0, 0)).save(folder / f"{wnid}{i:08d}.jpg")
        ...     data = tieredimagenet.load(pathlib.Path(tmp, "tiered"), "train", cache_dir=pathlib.Path(tmp, "cache"))
        ...     print(data.images.shape, data.labels.tolist(), data.classes)
        (5, 3, 84, 84) [0, 0, 0, 1, 1] ('n01530575', 'n01531178')
    """
    root = Path(root).expanduser()
    split, size = _check_split(split), _common.check_size(size, "the stored size")
    resample = _common.check_resample(resample)
    if not root.is_dir():
        raise FileNotFoundError(f"no tiered-ImageNet folder at {root}; pass the folder that holds train/, "
                                f"val/, test/ (class folders) or Ren et al.'s <split>_labels.pkl files.")
    layout, path = _layout(root, split)

    def build(new_sink):
        if layout == "folders":
            return _read_folders(path, size, resample, new_sink)
        return _read_files(root, split, layout, path, size, resample, new_sink)

    if not cache:
        images, meta = _cache.collect(build)
        data = _data(images, dict(meta, size=size))
        if data is None:  # what a reader builds always matches (only a cache entry can be stale)
            raise RuntimeError(f"tieredimagenet.load(): the images read from {path} do not match their labels.")
        return data
    tag = f"{split}.{size or 'full'}px-{resample}"
    request = {"format": _CACHE_FORMAT, "fingerprint": _fingerprint(root, split, layout, path),
               "source": str(path.resolve()), "layout": layout, "split": split, "size": size,
               "resample": resample}
    stem = _cache.stem(path, root.resolve().name or "root", tag, "tieredimagenet", cache_dir)
    return _cache.cached(stem, request=request, build=build, decode=_data, what="tiered-ImageNet",
                         explicit=cache_dir is not None)


def sampler(data: TieredImagenet, ways: int, *, normalize: bool | tuple = True, shuffle: bool = False,
            info: bool = False) -> Sampler:
    """N-way K-shot tasks over tiered-ImageNet, normalised as for mini-ImageNet.

    The task is that of `metabatch.tasks.classification` over
    `data.images` with `labels=data.labels` (`ways` distinct classes,
    labels `0 .. ways-1` in the order drawn, `n_ctx` support and
    `n_tgt` query images per class), then each image in `[0, 1]` is
    normalised per channel with ImageNet's statistics, as
    `metabatch.tasks.miniimagenet.sampler` does.

    Args:
        data: a `TieredImagenet` from `load`.
        ways: classes per task (N).
        normalize: `True`: ImageNet's mean and std
            (`metabatch.tasks.miniimagenet.MEAN`, `metabatch.tasks.miniimagenet.STD`);
            `False`: keep `[0, 1]`; or a pair `(mean, std)` of per-channel values.
        shuffle: shuffle the rows of the support and of the query set.
        info: also return `"info": {"classes": ..., "rotations": ...}`: the
            indices into `data.classes` behind labels `0 .. ways-1`.

    Returns:
        A `metabatch.tasks.miniimagenet.Sampler` `sample_task(key, idx,
        n_ctx, n_tgt)`: float32 `x` `[ways * n, 3, H, W]`, int64 `y`.

    Raises:
        TypeError: `data` is not a `TieredImagenet` of uint8 images, or a bad `normalize`.
        ValueError: `ways` is out of range, or `normalize` does not give
            one value per channel. A task asking for more images than the
            smallest class holds raises at call time.

    Examples:
        >>> import numpy as np, metabatch as mb
        >>> from metabatch.tasks import tieredimagenet
        >>> images = np.full((7, 3, 8, 8), 255, np.uint8)           # classes of 4 and 3 images
        >>> data = tieredimagenet.TieredImagenet(images, np.array([0, 0, 0, 0, 1, 1, 1]), ("a", "b"), None)
        >>> x, y = tieredimagenet.sampler(data, ways=2)(mb.random.key(0), 0, 1, 2)["target"]
        >>> x.shape, y.tolist(), round(float(x[0, 0, 0, 0]), 4)   # (1 - 0.485) / 0.229
        ((4, 3, 8, 8), [0, 0, 1, 1], 2.2489)
    """
    if not isinstance(data, TieredImagenet):
        raise TypeError(f"sampler(): data must be the TieredImagenet that load() returns, got "
                        f"{type(data).__name__}; for other data use metabatch.tasks.classification(images, "
                        f"ways, labels=labels).")
    if not isinstance(data.images, np.ndarray) or data.images.dtype != np.uint8 or data.images.ndim != 4:
        raise TypeError(f"sampler(): data.images must be uint8 [num_images, C, H, W], got "
                        f"{getattr(data.images, 'dtype', type(data.images).__name__)} "
                        f"{getattr(data.images, 'shape', '')}.")
    mean, std = _common.normalization(normalize, (MEAN, STD), data.images.shape[1], "sampler")
    tasks = classification(data.images, ways, labels=data.labels, shuffle=shuffle, info=info)
    return Sampler(tasks, mean, std)
