"""The uint8 image cache shared by the dataset readers (Omniglot, mini-ImageNet), and their Pillow import.

A cache entry is a pair ``<stem>.npy`` (the images) + ``<stem>.json`` (format,
fingerprint of the source, and whatever the reader needs to rebuild its
NamedTuple). Entries are written atomically (a temporary file, then a rename),
and one that is missing, stale (another fingerprint), half written or damaged
is never trusted: the reader builds the data again.

Where: next to the data when that folder is writable, else in the user cache
folder (``$METABATCH_CACHE/<dataset>``, or ``$XDG_CACHE_HOME/metabatch/<dataset>``,
``~/.cache/metabatch/<dataset>``), keyed there by the source's location too;
or only in ``cache_dir`` when the caller gives one.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_DAMAGED = (OSError, ValueError, KeyError, TypeError, EOFError)


def pil(reader: str, files: str):
    """``PIL.Image``, or an ImportError saying that ``reader`` needs Pillow to decode ``files``."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(f"metabatch.tasks.{reader} needs Pillow to decode the {files}: pip install pillow "
                          f"(or pip install 'metabatch[omniglot]'). Arrays already cached as .npy load "
                          f"without it.") from err
    return Image


def default_dir(dataset: str) -> Path:
    """The user cache folder of ``dataset``."""
    root = os.environ.get("METABATCH_CACHE")
    if root:
        return Path(root).expanduser() / dataset
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "metabatch" / dataset


def stems(source: Path, local: Path, name: str, suffix: str, dataset: str, cache_dir) -> list[Path]:
    """Cache stems (without .npy/.json) in the order they are tried.

    ``local`` is the stem next to the data; in a shared folder the stem is
    ``<name>-<digest of source's location>.<suffix>``, so that two copies of a
    dataset do not overwrite each other's cache.
    """
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:10]
    away = f"{name}-{digest}.{suffix}"
    if cache_dir is not None:
        return [Path(cache_dir).expanduser() / away]
    return [local, default_dir(dataset) / away]


def writable(folder: Path) -> bool:
    """Whether to write into ``folder``: writable for us *and* not marked read-only.

    A folder without any write bit (``r-xr-xr-x``, like a shared data folder)
    counts as read-only even for root, who could write there anyway.
    """
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def _read(stem: Path, fmt: int, fingerprint: str, decode: Callable[[np.ndarray, dict], Any]):
    try:
        info = json.loads(stem.with_name(stem.name + ".json").read_text())
        if info.get("format") != fmt or info.get("fingerprint") != fingerprint:
            return None
        images = np.load(stem.with_name(stem.name + ".npy"), allow_pickle=False)
        if images.dtype != np.uint8 or list(images.shape) != info["shape"]:
            return None
        return decode(images, info)
    except _DAMAGED:
        return None


def _write(stem: Path, images: np.ndarray, info: dict) -> None:
    """Write ``stem.npy`` then ``stem.json``, each atomically (a temporary file, then a rename)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix, write in ((".npy", lambda f: np.save(f, images, allow_pickle=False)),
                          (".json", lambda f: f.write(json.dumps(info, indent=1).encode()))):
        final = stem.with_name(stem.name + suffix)
        tmp = stem.with_name(f".{stem.name}{suffix}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)


def cached(stems: list[Path], *, fmt: int, fingerprint: str, build: Callable[[], Any],
           encode: Callable[[Any], tuple[np.ndarray, dict]], decode: Callable[[np.ndarray, dict], Any],
           info: dict, what: str, cache_dir) -> Any:
    """The data from the first valid cache entry among ``stems``, else ``build()``, cached.

    Args:
        stems: where to look and write, in order (:func:`stems`).
        fmt: the reader's cache format number; entries of another format are rebuilt.
        fingerprint: a digest of the source; entries of another source are rebuilt.
        build: reads the source; returns the data (a NamedTuple).
        encode: ``data -> (uint8 images, json-able metadata)``.
        decode: ``(images, metadata) -> data``, or ``None`` when they do not fit together.
        info: extra metadata to record (source, size, ...).
        what: the dataset's name, for messages.
        cache_dir: the caller's ``cache_dir`` (``None``: next to the data, else the user cache).

    Raises:
        OSError: ``cache_dir`` was given and the entry could not be written there.
    """
    for stem in stems:
        data = _read(stem, fmt, fingerprint, decode)
        if data is not None:
            return data
    data = build()
    images, meta = encode(data)
    info = dict(info, **meta, format=fmt, fingerprint=fingerprint, shape=list(images.shape))
    errors = []
    for stem in stems:
        if cache_dir is None and stem is stems[0] and not writable(stem.parent):
            errors.append(f"{stem.parent} is read-only")
            continue
        try:
            _write(stem, images, info)
            return data
        except OSError as err:  # a read-only data folder: try the next place
            errors.append(f"{stem}: {err}")
    if cache_dir is not None:
        raise OSError(f"could not write the {what} cache into cache_dir={cache_dir!r} "
                      f"({'; '.join(errors)}); pass a writable folder or cache=False.")
    warnings.warn(f"could not cache {info.get('source', what)} anywhere ({'; '.join(errors)}); set "
                  f"METABATCH_CACHE or cache_dir= to a writable folder to load it faster next time.",
                  RuntimeWarning, stacklevel=4)
    return data
