"""Checkpoints that a crash never destroys, loaded without running code.

[`save`][metabatch.checkpoint.save] writes to a temporary file in the checkpoint's own folder,
flushes and fsyncs it, then renames it over the checkpoint in one atomic
step: a crash at any moment leaves either the previous checkpoint or the new
one, never a torn file. Temporaries that a crashed writer left behind are
removed by the next [`save`][metabatch.checkpoint.save] to the same path.
[`save_json`][metabatch.checkpoint.save_json] writes the small JSON files a run keeps beside its
checkpoints (`metrics.json`) the same way.
[`load`][metabatch.checkpoint.load] reads with `torch.load(..., weights_only=True)`, which never
unpickles arbitrary objects: a checkpoint holds tensors, numbers, strings, and lists, tuples and
dicts of them (`state_dict()` of modules and optimizers, a step, a seed).
Store keys as [metabatch.random.key_data][] words, not as `Key` objects.

Examples:
    >>> import pathlib, tempfile, torch, metabatch as mb
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "last.pt"
    >>> net = torch.nn.Linear(2, 1)
    >>> _ = mb.checkpoint.save({"model": net.state_dict(), "step": 10}, path)
    >>> mb.checkpoint.load(path)["step"]
    10
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["load", "save", "save_json"]

# A crashed writer's temporary: ".<name>.<pid>.<random>.tmp" next to the checkpoint.
_STALE_AFTER_S = 24 * 3600  # a temporary of a live pid this old is abandoned too (pid reuse)


def _temporaries(path: Path) -> list[tuple[Path, int]]:
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[0-9a-f]+\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [(path.parent / n, int(m.group(1))) for n in names if (m := pattern.fullmatch(n))]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale(path: Path) -> None:
    now = time.time()
    for tmp, pid in _temporaries(path):
        try:
            if pid != os.getpid() and (not _pid_alive(pid) or now - tmp.stat().st_mtime > _STALE_AFTER_S):
                tmp.unlink()
        except OSError:
            pass  # gone already, or not ours to remove


def save(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` to `path` with `torch.save`, atomically.

    Args:
        obj: what `torch.save` accepts and `weights_only=True` loads back:
            tensors, numbers, strings, `None` and lists / tuples / dicts of them.
        path: the checkpoint file; its folder is created if missing.

    Returns:
        `path` as a `pathlib.Path`.

    Raises:
        OSError: the folder cannot be written (the previous checkpoint, if any, is intact).

    Examples:
        >>> import pathlib, tempfile, torch, metabatch as mb
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "ckpt" / "last.pt"
        >>> mb.checkpoint.save({"w": torch.ones(2)}, path).name
        'last.pt'
        >>> sorted(p.name for p in path.parent.iterdir())    # no temporary left behind
        ['last.pt']
    """
    return _write_atomically(path, lambda f: torch.save(obj, f))


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` as indented JSON to `path`, atomically (as [`save`][metabatch.checkpoint.save] does).

    For the small files a run keeps beside its checkpoints (`metrics.json`, a config): a
    crash while writing leaves the previous file whole.

    Args:
        obj: what `json.dump` accepts.
        path: the file; its folder is created if missing.

    Returns:
        `path` as a `pathlib.Path`.

    Raises:
        TypeError: `obj` holds something JSON cannot encode (the previous file, if any, is intact).
        OSError: the folder cannot be written (the previous file, if any, is intact).

    Examples:
        >>> import json, pathlib, tempfile, metabatch as mb
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> path = mb.checkpoint.save_json({"step": 3, "loss": 0.5}, folder / "metrics.json")
        >>> json.loads(path.read_text())
        {'step': 3, 'loss': 0.5}
    """
    def write(f: IO[bytes]) -> None:
        text = json.dumps(obj, indent=2) + "\n"
        f.write(text.encode())

    return _write_atomically(Path(path), write)


def _write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """`write(f)` into a temporary beside `path`, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


def load(path: str | os.PathLike, *, map_location: Any = "cpu") -> Any:
    """Read a checkpoint written by `save` (or `torch.save`) with `weights_only=True`.

    Args:
        path: the checkpoint file.
        map_location: where tensors go, as in `torch.load` (default `"cpu"`).

    Returns:
        The saved object.

    Raises:
        FileNotFoundError: there is no file at `path`.
        ValueError: the file is not a readable checkpoint (truncated, not written by
            `torch.save`) or holds objects that `weights_only=True` refuses to build.

    Examples:
        >>> import pathlib, tempfile, torch, metabatch as mb
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "last.pt"
        >>> _ = mb.checkpoint.save({"step": 3, "w": torch.zeros(1)}, path)
        >>> mb.checkpoint.load(path)
        {'step': 3, 'w': tensor([0.])}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint.load(): no checkpoint at {str(path)!r}.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"checkpoint.load(): {str(path)!r} is not a readable checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}). It may be truncated or written by "
                         f"something other than torch.save, or hold objects other than tensors, numbers, "
                         f"strings and containers of them (weights_only=True refuses to run code).") from err
