"""Omniglot (Lake et al. 2015): the official zips or folders as one class array.

`load` reads `images_background.zip`, `images_evaluation.zip`,
`images_background_small1.zip` / `small2.zip` or their unpacked folders
(`alphabet/character/*.png`), resizes every image (28x28 by default) and
returns an `Omniglot`: a uint8 array `[num_classes, 20, size, size]`
(ink 255 on paper 0) plus the alphabet and character name of every class, so
that you can split by alphabet with `select`. Feed `data.images` to
`metabatch.tasks.classification` for N-way K-shot tasks.

The resized array is cached as a uint8 `.npy` (plus a `.json` of names)
in the user cache folder, `$METABATCH_CACHE/omniglot` (else
`$XDG_CACHE_HOME/metabatch/omniglot`, else `~/.cache/metabatch/omniglot`),
or in the `cache_dir` you pass, and read back memory-mapped: `images` is a
read-only `metabatch.tasks.MmapArray` that loader workers share instead of
copying. Pillow decodes the PNG files; it is needed only to build a cache.

`load_runs` reads the 20 one-shot classification runs of Lake et al.
(`all_runs.zip`: `runXX/training/classNN.png`, `runXX/test/itemNN.png`,
`runXX/class_labels.txt`) and `score_runs` scores a classifier on
them. `download` fetches the official files (`load(...,
download=True)` calls it) and checks their sha256.

Cite: Lake, Salakhutdinov & Tenenbaum (2015), Human-level concept learning
through probabilistic program induction, Science 350(6266), 1332-1338.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import torch

from . import _cache, _common

__all__ = [
    "SOURCES",
    "Omniglot",
    "Run",
    "RunsScore",
    "Source",
    "concat",
    "download",
    "load",
    "load_runs",
    "score_runs",
    "select",
]


class Source(NamedTuple):
    """Where an official Omniglot file lives and what it must hash to.

    Attributes:
        url: the download URL (Brenden Lake's repository).
        sha256: the hex sha256 of the file, or `None` where none is published.
        size: the size in bytes, or `None`.
    """

    url: str
    sha256: str | None
    size: int | None


_BASE = "https://github.com/brendenlake/omniglot/raw/master/python/"

#: The official files. The four image zips' checksums are those that TensorFlow Datasets
#: pins for the same URLs (the two small zips were verified against local copies);
#: `all_runs.zip`'s is that of the file in the repository's python/one-shot-classification/.
SOURCES = {
    "images_background.zip": Source(
        _BASE + "images_background.zip",
        "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640", 9464212),
    "images_evaluation.zip": Source(
        _BASE + "images_evaluation.zip",
        "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee", 6462886),
    "images_background_small1.zip": Source(
        _BASE + "images_background_small1.zip",
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4", 1319022),
    "images_background_small2.zip": Source(
        _BASE + "images_background_small2.zip",
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f", 1580917),
    "all_runs.zip": Source(
        _BASE + "one-shot-classification/all_runs.zip",
        "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325", None),
}

def _urlopen(url: str, timeout: float):
    """Open `url` (a module attribute, so that tests can serve local files instead)."""
    import urllib.request  # imported on use: it costs more than the rest of this module

    return urllib.request.urlopen(url, timeout=timeout)

_CACHE_FORMAT = 1


class Omniglot(NamedTuple):
    """Omniglot characters as one class array.

    Attributes:
        images: uint8 `[num_classes, examples_per_class, size, size]`, ink 255
            on paper 0; classes sorted by (alphabet, character), examples by
            file name (drawer).
        alphabets: the alphabet name of each class, e.g. `"Japanese_(katakana)"`.
        characters: the character folder of each class, e.g. `"character07"`.
    """

    images: np.ndarray
    alphabets: tuple
    characters: tuple


def _check_size(size) -> int | None:
    return _common.check_size(size, "105x105")


def _check_resample(resample) -> str:
    return _common.check_resample(resample)


def _decode(data: bytes, size: int | None, resample: str, where: str = "") -> np.ndarray:
    """One PNG -> uint8 (ink 255), resized to `size x size` with Pillow's `resample` filter.

    Raises:
        ValueError: Pillow cannot read it (junk, truncated): the message names `where`.
    """
    Image = _common.pil("omniglot", "Omniglot PNG files")
    try:
        with Image.open(io.BytesIO(data)) as im:
            ink = 255 - np.asarray(im.convert("L"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read the image {where or 'given'} ({type(err).__name__}: {err}); the data "
                         f"is damaged: fetch the official file again (download=True checks its sha256) or "
                         f"replace that image.") from None
    if size is not None and ink.shape != (size, size):
        filt = getattr(Image.Resampling, resample.upper())
        ink = np.asarray(Image.fromarray(ink).resize((size, size), filt), dtype=np.uint8)
    return ink


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is neither a folder nor a valid zip file ({err}); it may be truncated or "
                         f"damaged: fetch it again (download=True checks the official sha256), or pass its "
                         f"unpacked alphabet/character/*.png folder.") from None


def _member_reader(archive: zipfile.ZipFile, path: Path) -> Callable[[str], bytes]:
    """`archive.read`, with damaged members named."""
    def read(name: str) -> bytes:
        try:
            return archive.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as err:
            raise ValueError(f"{path}: cannot read the member {name} ({type(err).__name__}: {err}); the zip is "
                             f"damaged: fetch it again (download=True checks the official sha256).") from None
    return read


# -- reading a zip or a folder ------------------------------------------------------------------

def _pngs(path: Path) -> tuple[dict, Callable[[str], bytes], Callable[[], None]]:
    """`{(alphabet, character): [names]}`, a reader for a name, and a closer."""
    groups: dict = {}
    if path.is_dir():
        files = [p for p in path.rglob("*.png") if not any(part.startswith((".", "__MACOSX"))
                                                         for part in p.relative_to(path).parts)]
        for p in files:
            parts = (path.name,) + p.relative_to(path).parts
            groups.setdefault((parts[-3], parts[-2]), []).append(str(p))
        return groups, lambda name: Path(name).read_bytes(), lambda: None
    archive = _open_zip(path)
    for name in archive.namelist():
        parts = (path.stem,) + PurePosixPath(name).parts
        if name.lower().endswith(".png") and not any(p.startswith((".", "__MACOSX")) for p in parts[1:]):
            groups.setdefault((parts[-3], parts[-2]), []).append(name)
    return groups, _member_reader(archive, path), archive.close


def _read_source(path: Path, size: int | None, resample: str, new_sink: Callable) -> dict:
    """Decode every PNG into `new_sink((num_classes, per_class))`; returns the class names."""
    groups, read, close = _pngs(path)
    try:
        if not groups:
            raise ValueError(f"found no PNG files in {path}; Omniglot data must follow the layout "
                             f"alphabet/character/*.png (as in the official zips).")
        keys = sorted(groups)
        counts = {k: len(groups[k]) for k in keys}
        common = max(set(counts.values()), key=list(counts.values()).count)
        odd = [k for k in keys if counts[k] != common]
        if odd:
            a, c = odd[0]
            raise ValueError(f"{path}: character {a}/{c} has {counts[odd[0]]} images but most have "
                             f"{common}; every class needs the same number of examples (remove or "
                             f"complete the {len(odd)} odd character folder(s)).")
        out = new_sink((len(keys), common))
        folder = path.is_dir()
        for k in keys:
            for name in sorted(groups[k]):
                where = name if folder else f"{name} in {path}"
                ink = _decode(read(name), size, resample, where)
                if out.item_shape is not None and ink.shape != out.item_shape:
                    first = out.item_shape
                    raise ValueError(f"{path}: {name} is {ink.shape[1]}x{ink.shape[0]} but earlier images "
                                     f"are {first[1]}x{first[0]}; pass size=... to resize them all.")
                out.append(ink)
    finally:
        close()
    return {"alphabets": [a for a, _ in keys], "characters": [c for _, c in keys]}


def _fingerprint(path: Path) -> str:
    """A cheap identity of the source's content: the zip's directory (names, CRCs) or the files' stats."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*.png")):
            st = p.stat()
            h.update(f"{p.relative_to(path).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        with _open_zip(path) as archive:
            for info in archive.infolist():
                h.update(f"{info.filename}:{info.CRC}:{info.file_size}\n".encode())
    return h.hexdigest()


# -- the cache ----------------------------------------------------------------------------------

def _from_cache(images: np.ndarray, info: dict) -> Omniglot | None:
    data = Omniglot(images, tuple(info["alphabets"]), tuple(info["characters"]))
    size = info.get("size")
    fits = images.ndim == 4 and (size is None or images.shape[2:] == (size, size))
    return data if fits and len(images) == len(data.alphabets) == len(data.characters) else None


def load(path: str | os.PathLike, *, size: int | None = 28, resample: str = "lanczos", cache: bool = True,
         cache_dir: str | os.PathLike | None = None, download: bool = False) -> Omniglot:
    """Read Omniglot from an official zip or its unpacked folder.

    Images are inverted (ink 255 on paper 0, as models expect) and resized
    with Pillow's `resample` filter (Lanczos, as in Finn et al.'s MAML
    preprocessing). The first call decodes every PNG (a few seconds for
    `images_background.zip`) and caches the result; later calls map the
    cache (milliseconds). A cache is used only while it matches the request
    (same source: zip directory, or file sizes and times in a folder; same
    size and filter); anything else is rebuilt.

    With the cache on, `images` is a read-only `metabatch.tasks.MmapArray`
    of the cache file: loader workers under any start method share it with
    the main process instead of copying it.

    Args:
        path: a zip (`images_background.zip`, `images_evaluation.zip`,
            `images_background_small1.zip` ...) or a folder holding
            `alphabet/character/*.png` (one level above is fine too).
        size: the output side in pixels; `None` keeps 105x105.
        resample: `"lanczos"`, `"box"`, `"bilinear"`, `"bicubic"`,
            `"hamming"` or `"nearest"`.
        cache: read and write the cache; `False` always decodes, into memory.
        cache_dir: the folder of the cache (created if missing). `None`:
            `$METABATCH_CACHE/omniglot`, else
            `$XDG_CACHE_HOME/metabatch/omniglot`, else
            `~/.cache/metabatch/omniglot`; logged once (logger
            `metabatch.tasks`, level INFO). Nothing is written next to the
            data unless `cache_dir` points there; a cache that metabatch <
            0.10 wrote next to the data is still read while it matches.
        download: fetch `path` first with `download` if it is missing and
            named like an official file; if it is there, check its sha256.

    Returns:
        An `Omniglot` `(images, alphabets, characters)`.

    Raises:
        FileNotFoundError: `path` does not exist (and `download` is off).
        ValueError: no PNG files, characters with different numbers of images,
            a damaged zip or image (named), a file whose sha256 does not match
            (with `download=True`), a bad `size` or `resample`.
        ImportError: Pillow is missing and there is no cache to read.
        OSError: `cache_dir` was given but cannot be written; a failed download.

    Examples:
        >>> import tempfile, pathlib, numpy as np
        >>> from PIL import Image
        >>> from metabatch.tasks import omniglot
        >>> with tempfile.TemporaryDirectory() as tmp:   # 2 alphabets x 1 character x 3 drawers
        ...     for alphabet in ("Greek", "Latin"):
        ...         folder = pathlib.Path(tmp, "omniglot", alphabet, "character01")
        ...         folder.mkdir(parents=True)
        ...         for i in range(3):
        ...             Image.new("1", (105, 105), 1).save(folder / f"0001_0{i}.png")
        ...     data = omniglot.load(pathlib.Path(tmp, "omniglot"), size=28, cache_dir=pathlib.Path(tmp, "cache"))
        ...     print(data.images.shape, data.images.dtype, type(data.images).__name__, data.alphabets)
        (2, 3, 28, 28) uint8 MmapArray ('Greek', 'Latin')
    """
    path = Path(path).expanduser()
    size, resample = _check_size(size), _check_resample(resample)
    if download and path.name in SOURCES:
        _download(path.name, path.parent)  # fetches a missing file, checks one that is there
    elif not path.exists():
        hint = (f" Pass download=True to fetch it from {SOURCES[path.name].url}."
                if path.name in SOURCES else "")
        raise FileNotFoundError(f"no Omniglot zip or folder at {path}.{hint}")

    def build(new_sink):
        return _read_source(path, size, resample, new_sink)

    if not cache:
        images, meta = _cache.collect(build)
        return Omniglot(images, tuple(meta["alphabets"]), tuple(meta["characters"]))
    name = path.name[:-4] if path.name.lower().endswith(".zip") else path.name
    tag = f"{size or 'full'}px-{resample}"
    request = {"format": _CACHE_FORMAT, "fingerprint": _fingerprint(path), "source": str(path.resolve()),
               "size": size, "resample": resample, "ink": 255}
    return _cache.cached(_cache.stem(path, name, tag, "omniglot", cache_dir), request=request, build=build,
                         decode=_from_cache, what="Omniglot", explicit=cache_dir is not None,
                         legacy=path.parent / f"{name}.{tag}")


def select(data: Omniglot, alphabets: Sequence[str] | None = None, *,
           exclude: Sequence[str] = ()) -> Omniglot:
    """The classes of some alphabets, e.g. to evaluate on alphabets never trained on.

    Args:
        data: an `Omniglot`.
        alphabets: the alphabet names to keep (`None`: all).
        exclude: alphabet names to drop (applied after `alphabets`); unknown
            names are fine here, so `exclude=train.alphabets` works.

    Returns:
        A new `Omniglot` (the images are copied), classes in their order.

    Raises:
        ValueError: a name in `alphabets` is not in `data`, or nothing is left.

    Examples:
        >>> import numpy as np
        >>> from metabatch.tasks import omniglot
        >>> data = omniglot.Omniglot(np.zeros((3, 2, 4, 4), np.uint8), ("Greek", "Greek", "Latin"),
        ...                          ("character01", "character02", "character01"))
        >>> omniglot.select(data, exclude=["Greek"]).alphabets
        ('Latin',)
        >>> omniglot.select(data, ["Greek"]).images.shape
        (2, 2, 4, 4)
    """
    present = set(data.alphabets)
    if isinstance(alphabets, str) or isinstance(exclude, str):
        raise TypeError("select(): alphabets and exclude are lists of names; wrap one name in a list.")
    if alphabets is not None:
        missing = sorted(set(alphabets) - present)
        if missing:
            raise ValueError(f"select(): no alphabet {missing} in this data; it has {sorted(present)}.")
        keep = set(alphabets)
    else:
        keep = present
    keep = keep - set(exclude)
    mask = np.array([a in keep for a in data.alphabets], dtype=bool)
    if not mask.any():
        raise ValueError(f"select(): no class left (alphabets={alphabets!r}, exclude={list(exclude)!r}).")
    pick = np.flatnonzero(mask)
    return Omniglot(data.images[pick], tuple(data.alphabets[i] for i in pick),
                    tuple(data.characters[i] for i in pick))


def concat(*datasets: Omniglot) -> Omniglot:
    """Join the classes of several `Omniglot` values (e.g. background + evaluation).

    Raises:
        ValueError: no dataset, shapes that differ, or a class (alphabet,
            character) present twice: drop it first with `select`.

    Examples:
        >>> import numpy as np
        >>> from metabatch.tasks import omniglot
        >>> a = omniglot.Omniglot(np.zeros((1, 2, 4, 4), np.uint8), ("Greek",), ("character01",))
        >>> b = omniglot.Omniglot(np.ones((1, 2, 4, 4), np.uint8), ("Latin",), ("character01",))
        >>> omniglot.concat(a, b).alphabets
        ('Greek', 'Latin')
    """
    if not datasets:
        raise ValueError("concat() needs at least one Omniglot value.")
    shapes = {d.images.shape[1:] for d in datasets}
    if len(shapes) > 1:
        raise ValueError(f"concat(): the datasets have different image shapes {sorted(shapes)}; load them "
                         f"with the same size=.")
    seen, dup = set(), []
    for d in datasets:
        for k in zip(d.alphabets, d.characters, strict=True):
            if k in seen:
                dup.append(k)
            seen.add(k)
    if dup:
        a, c = dup[0]
        raise ValueError(f"concat(): {len(dup)} classes appear twice, e.g. {a}/{c} (the small background "
                         f"subsets share Greek and Latin); drop them with select(d, exclude=[...]).")
    return Omniglot(np.concatenate([d.images for d in datasets]),
                    sum((d.alphabets for d in datasets), ()), sum((d.characters for d in datasets), ()))


# -- downloads ----------------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(name: str, root: str | os.PathLike = ".", *, sha256: str | None = None,
             timeout: float = 60.0) -> Path:
    """Fetch an official Omniglot file into `root` and check its sha256.

    The file is streamed into a temporary file beside its destination and
    renamed into place only once its size and sha256 match `SOURCES`,
    so an interrupted or corrupt download never leaves a file behind. An
    existing file is checked, not fetched again.

    Args:
        name: one of `SOURCES`: `"images_background.zip"`,
            `"images_evaluation.zip"`, `"images_background_small1.zip"`,
            `"images_background_small2.zip"`, `"all_runs.zip"`.
        root: the destination folder (created if missing).
        sha256: the expected hex sha256, overriding the table (for a copy
            that differs from the official file).
        timeout: seconds to wait for the server.

    Returns:
        The path of the verified file, `root / name`.

    Raises:
        ValueError: an unknown `name`, or a file whose size or sha256 does
            not match (nothing is kept).
        OSError: the download itself failed (no network...).

    Examples:
        >>> import hashlib, pathlib, tempfile
        >>> from metabatch.tasks import omniglot
        >>> with tempfile.TemporaryDirectory() as tmp:   # already there: only checked
        ...     path = pathlib.Path(tmp, "all_runs.zip")
        ...     _ = path.write_bytes(b"runs")
        ...     omniglot.download("all_runs.zip", tmp, sha256=hashlib.sha256(b"runs").hexdigest()) == path
        True
    """
    return _download(name, root, sha256=sha256, timeout=timeout)


def _download(name: str, root, *, sha256: str | None = None, timeout: float = 60.0) -> Path:
    if name not in SOURCES:
        raise ValueError(f"download(): unknown Omniglot file {name!r}; the official files are "
                         f"{', '.join(SOURCES)}.")
    source = SOURCES[name]
    want = sha256 if sha256 is not None else source.sha256
    root = Path(root).expanduser()
    dest = root / name
    if dest.exists():
        if want is not None:
            got = _sha256_file(dest)
            if got != want:
                raise ValueError(f"download(): {dest} exists but its sha256 is {got}, not {want}; "
                                 f"delete it and download again.")
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.{os.getpid()}.part"
    h, nbytes = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            try:
                with _urlopen(source.url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        h.update(chunk)
                        f.write(chunk)
                        nbytes += len(chunk)
            except OSError as err:  # URLError, timeouts, refused connections, a full disk
                reason = getattr(err, "reason", None) or err
                raise OSError(f"download(): could not fetch {source.url} ({type(err).__name__}: {reason}); "
                              f"nothing was kept. Check the network and retry, or fetch the file by hand "
                              f"into {root}.") from err
        if sha256 is None and source.size is not None and nbytes != source.size:
            raise ValueError(f"download(): {source.url} gave {nbytes} bytes, expected {source.size}; "
                             f"nothing was kept. Retry, or fetch it by hand into {root}.")
        got = h.hexdigest()
        if want is not None and got != want:
            raise ValueError(f"download(): {source.url} has sha256 {got}, expected {want}; nothing "
                             f"was kept. Retry, or fetch it by hand into {root}.")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# -- one-shot classification runs ----------------------------------------------------------------

class Run(NamedTuple):
    """One of Lake et al.'s 20-way one-shot classification runs.

    Attributes:
        name: the run's folder name, e.g. `"run01"`.
        training: uint8 `[n_train, size, size]` (ink 255): one image per
            class, in file-name order (`class01`, `class02`, ...): every
            image of `training/`, referenced in `class_labels.txt` or not.
        test: uint8 `[n_test, size, size]`: the items to classify, in
            file-name order (`item01`, ...).
        labels: int64 `[n_test]`: the index into `training` of each test
            item's class (from `class_labels.txt`).
    """

    name: str
    training: np.ndarray
    test: np.ndarray
    labels: np.ndarray


def _tail(entry: str) -> str:
    """`run01/test/item01.png` (or `test/item01.png`) -> `test/item01.png`."""
    parts = PurePosixPath(entry.replace("\\", "/")).parts
    if len(parts) < 2 or parts[-2] not in ("training", "test"):
        raise ValueError(f"class_labels.txt: {entry!r} is not a training/... or test/... image path.")
    return "/".join(parts[-2:])


def _read_run(name: str, labels_text: str, training_files: list, read: Callable[[str], bytes],
              size, resample, name_of: Callable[[str], str]) -> Run:
    pairs = [line.split() for line in labels_text.splitlines() if line.strip()]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{name}/class_labels.txt must hold lines 'test/itemNN.png training/classNN.png'.")
    answer = {_tail(t): _tail(c) for t, c in pairs}
    test = sorted(answer)
    training = sorted(set(answer.values()) | set(training_files))  # unused classes are choices too
    where = {c: i for i, c in enumerate(training)}
    labels = np.array([where[answer[t]] for t in test], dtype=np.int64)

    def load_all(files):
        return np.stack([_decode(read(f), size, resample, name_of(f)) for f in files])

    return Run(name, load_all(training), load_all(test), labels)


def load_runs(path: str | os.PathLike, *, size: int | None = 28, resample: str = "lanczos",
              download: bool = False) -> tuple:
    """Read Lake et al.'s one-shot classification runs.

    Args:
        path: `all_runs.zip`, the folder it unpacks to (holding `run01` ..
            `run20`), or one run folder. Each run holds
            `class_labels.txt` (lines `runXX/test/itemNN.png
            runXX/training/classNN.png`), `training/*.png` and `test/*.png`.
        size: the output side in pixels (as in `load`); `None` keeps 105.
        resample: the Pillow filter, as in `load`.
        download: if `path` is `all_runs.zip`, fetch it when missing and
            check its sha256 (the official file's) when it is there.

    Returns:
        A tuple of `Run`, sorted by name.

    Raises:
        FileNotFoundError: no runs at `path`.
        ValueError: a malformed `class_labels.txt`, a damaged zip or image
            (named), an `all_runs.zip` whose sha256 does not match (with
            `download=True`).
        OSError: a failed download (the message names the URL).

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> from metabatch.tasks import omniglot
        >>> with tempfile.TemporaryDirectory() as tmp:   # one 2-way run
        ...     run = pathlib.Path(tmp, "run01")
        ...     for sub, stem in (("training", "class"), ("test", "item")):
        ...         (run / sub).mkdir(parents=True)
        ...         for i in (1, 2):
        ...             Image.new("1", (105, 105), 1).save(run / sub / f"{stem}0{i}.png")
        ...     _ = (run / "class_labels.txt").write_text(
        ...         "run01/test/item01.png run01/training/class02.png\\n"
        ...         "run01/test/item02.png run01/training/class01.png\\n")
        ...     runs = omniglot.load_runs(tmp)
        >>> runs[0].name, runs[0].training.shape, runs[0].labels.tolist()
        ('run01', (2, 28, 28), [1, 0])
    """
    path = Path(path).expanduser()
    size, resample = _check_size(size), _check_resample(resample)
    if download and path.name == "all_runs.zip":
        _download("all_runs.zip", path.parent)  # fetches a missing file, checks one that is there
    if not path.exists():
        raise FileNotFoundError(f"no one-shot runs at {path}; pass all_runs.zip or the folder holding "
                                f"run01 .. run20 (download=True fetches {SOURCES['all_runs.zip'].url}).")
    runs = []
    if path.is_dir():
        for labels_file in sorted(path.rglob("class_labels.txt")):
            folder = labels_file.parent
            training = [f"training/{p.name}" for p in (folder / "training").glob("*.png")]

            def read_file(f: str, folder: Path = folder) -> bytes:
                return (folder / f).read_bytes()

            def name_file(f: str, folder: Path = folder) -> str:
                return str(folder / f)

            runs.append(_read_run(folder.name, labels_file.read_text(), training, read_file, size, resample,
                                  name_file))
    else:
        with _open_zip(path) as archive:
            read = _member_reader(archive, path)
            names = archive.namelist()
            for entry in sorted(names):
                if PurePosixPath(entry).name != "class_labels.txt" or "__MACOSX" in entry:
                    continue
                prefix = entry[:-len("class_labels.txt")]
                name = PurePosixPath(prefix).name or path.stem
                training = [n[len(prefix):] for n in names if n.startswith(prefix + "training/")
                            and n.lower().endswith(".png") and "/" not in n[len(prefix) + 9:]]

                def read_member(f: str, p: str = prefix) -> bytes:
                    return read(p + f)

                def name_member(f: str, p: str = prefix) -> str:
                    return f"{p + f} in {path}"

                runs.append(_read_run(name, read(entry).decode(), training, read_member, size, resample,
                                      name_member))
    if not runs:
        raise FileNotFoundError(f"found no run (no class_labels.txt) in {path}.")
    return tuple(sorted(runs, key=lambda r: r.name))


class RunsScore(NamedTuple):
    """The result of `score_runs`.

    Attributes:
        errors: float64 `[num_runs]`: the percent error of each run.
        mean_error: their mean, in percent (Lake et al. report this).
    """

    errors: np.ndarray
    mean_error: float


def score_runs(runs: Sequence[Run], classify: Callable, *, channel_dim: bool = True) -> RunsScore:
    """Score a one-shot classifier on Lake et al.'s runs (percent error, as in the paper).

    For each run, `classify(support, query)` sees the run's training images
    (`support[i]` is the only example of class `i`) and its test images,
    both float32 in `[0, 1]` (ink 1) of shape `[n, 1, size, size]` (or
    `[n, size, size]` with `channel_dim=False`), exactly as
    `metabatch.tasks.classification` produces them. It returns either
    the predicted class of each query (ints `[n_query]`) or a score matrix
    `[n_query, n_support]` where larger means more alike (pass `-cost`
    for a distance); numpy arrays and tensors both work.

    Args:
        runs: the runs, from `load_runs`.
        classify: `classify(support, query) -> predictions or scores`.
        channel_dim: give the images a channel dimension.

    Returns:
        A `RunsScore` `(errors, mean_error)` in percent.

    Raises:
        ValueError: `classify` returned something of the wrong shape.

    Examples:
        >>> import numpy as np
        >>> from metabatch.tasks import omniglot
        >>> images = np.zeros((3, 5, 5), np.uint8)
        >>> images[0, 0], images[1, 2], images[2, 4] = 255, 255, 255   # 3 classes: a line each
        >>> run = omniglot.Run("run01", images, images[::-1], np.array([2, 1, 0]))
        >>> def nearest(support, query):   # minus the squared distance as the score
        ...     return -((query[:, None] - support[None]) ** 2).sum(axis=(2, 3, 4))
        >>> omniglot.score_runs([run], nearest)
        RunsScore(errors=array([0.]), mean_error=0.0)
    """
    if not runs:
        raise ValueError("score_runs() needs at least one run; load them with load_runs(path).")
    errors = []
    for run in runs:
        support, query = (_common.to_float(x).reshape((len(x),) + _common.item_shape(x.shape[1:], channel_dim))
                          for x in (run.training, run.test))
        out = classify(support, query)
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().numpy()
        out = np.asarray(out)
        n_query, n_support = len(query), len(support)
        if out.shape == (n_query, n_support):
            predicted = out.argmax(axis=1)
        elif out.shape == (n_query,) and np.issubdtype(out.dtype, np.integer):
            predicted = out
        else:
            raise ValueError(f"score_runs(): classify returned shape {out.shape} (dtype {out.dtype}) for "
                             f"{run.name}; return int predictions ({n_query},) or scores "
                             f"({n_query}, {n_support}).")
        errors.append(100.0 * float(np.mean(predicted != run.labels)))
    per_run = np.array(errors)
    return RunsScore(per_run, float(per_run.mean()))
