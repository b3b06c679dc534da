"""Stacking task outputs into one flat buffer (private, shared by the loader and its transport).

A batch of `T` task outputs (equal pytrees of tensors, numpy arrays or
numbers) becomes one flat `uint8` buffer holding every stacked leaf back to
back (64-byte aligned), plus a `Layout` that says where each leaf
lives. `fill` writes the buffer that an `alloc(nbytes)` callback gives
it (plain memory in the main process, a shared-memory buffer in a loader
worker: see `_transport`), and `Layout.tensors` cuts the buffer back into
zero-copy tensor views. Errors name the first two tasks of a batch that
differ, and the leaf.
"""

from __future__ import annotations

import math

import numpy as np
import optree
import torch

from .sampler import BatchSpec

_ALIGN = 64

_TORCH_DTYPE = {np.dtype(d): torch.from_numpy(np.empty(0, dtype=d)).dtype for d in (
    np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32,
    np.float64, np.complex64, np.complex128)}
_NUMPY_DTYPE = {t: n for n, t in _TORCH_DTYPE.items()}
_NUMBERS = (bool, int, float)

# How a leaf is stacked (chosen from task 0's leaf, kept in the layout).
_TENSOR, _ARRAY, _SCALAR, _NUMBER, _OTHER = range(5)


class LeafTypeError(TypeError):
    """A task output holds a leaf that cannot be stacked into a tensor (a string, an object array...)."""


def add_note(err: BaseException, note: str) -> None:
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:  # Python 3.10: keep the context where tools can still find it
        err.__notes__ = getattr(err, "__notes__", []) + [note]  # type: ignore[attr-defined]


_INT64 = (-2**63, 2**63 - 1)


def _leaf_path(treespec, i: int) -> str:
    return path_str(optree.tree_paths(optree.tree_unflatten(treespec, range(treespec.num_leaves)))[i])


def _leaf_meta(leaf, i: int, treespec, spec=None):
    """(torch dtype, shape, kind) of leaf `i` of task 0's output."""
    if isinstance(leaf, torch.Tensor):
        return leaf.dtype, tuple(leaf.shape), _TENSOR
    if isinstance(leaf, (np.ndarray, np.generic)):
        dtype = _TORCH_DTYPE.get(leaf.dtype)
        if dtype is not None:
            if isinstance(leaf, np.generic):
                return dtype, (), _SCALAR
            return dtype, leaf.shape, _ARRAY if leaf.ndim else _OTHER
        problem = f"a numpy array of dtype {leaf.dtype}, which torch cannot hold"
    elif isinstance(leaf, _NUMBERS):
        if isinstance(leaf, int) and not isinstance(leaf, bool) and not _INT64[0] <= leaf <= _INT64[1]:
            raise ValueError(f"{_where(spec)}leaf {_leaf_path(treespec, i)} of {_describe(spec, 0)} is the int "
                             f"{_short_int(leaf)}, outside torch's int64 range [-2**63, 2**63 - 1]; store it as "
                             f"a float, split it into smaller ints, or leave it out of the task output.")
        return torch.tensor(leaf).dtype, (), _NUMBER if type(leaf) in _NUMBERS else _OTHER
    else:
        problem = f"a {type(leaf).__name__} ({leaf!r:.60})"
    raise LeafTypeError(f"{_where(spec)}leaf {_leaf_path(treespec, i)} of a task output is {problem}; task "
                        f"outputs must be pytrees of tensors, numeric numpy arrays or numbers.")


def _short_int(value: int) -> str:
    text = str(value)
    return text if len(text) <= 30 else f"{text[:12]}...{text[-6:]} ({value.bit_length()} bits)"


def _where(spec) -> str:
    return "" if spec is None else f"step {spec.step}: "


def path_str(path) -> str:
    return "".join(f"[{p!r}]" for p in path) or "<root>"


def _describe(spec: BatchSpec | None, j: int) -> str:
    if spec is None:
        return f"task {j}"
    return f"task {j} (index {spec.indices[j]})"


def _mismatch(spec, j, what) -> ValueError:
    return ValueError(f"{_where(spec)}{_describe(spec, 0)} and {_describe(spec, j)} of one batch differ: {what}. "
                      f"Every task of a batch must return the same pytree with the same leaf shapes "
                      f"and dtypes; size arrays by n_ctx / n_tgt.")


class Layout:
    """Where each stacked leaf of a batch lives inside one flat byte buffer.

    Layouts are cached (`layout_of`): a batch of the same structure, leaf
    dtypes and shapes as an earlier one reuses its layout, and a worker sends
    each layout to the main process once (`_transport.Sender`).
    """

    __slots__ = ("_cuts", "dtypes", "kinds", "nbytes", "offsets", "shapes", "treespec")

    def __init__(self, treespec, dtypes, shapes, kinds):
        self.treespec, self.dtypes, self.shapes, self.kinds = treespec, dtypes, shapes, kinds
        self.offsets, self._cuts, offset = [], [], 0
        for dtype, shape in zip(dtypes, shapes, strict=True):
            offset = -(-offset // _ALIGN) * _ALIGN
            size = math.prod(shape) * dtype.itemsize
            self.offsets.append(offset)
            # numpy arrays are cut with np.ndarray(shape, dtype, buffer, offset) (1.8 µs a
            # leaf against 5 µs for torch slicing); dtypes numpy lacks (bfloat16) in torch.
            self._cuts.append((shape, _NUMPY_DTYPE.get(dtype), offset, size, dtype))
            offset += size
        self.nbytes = offset

    def __reduce__(self):
        return Layout, (self.treespec, self.dtypes, self.shapes, self.kinds)

    def arrays(self, raw: np.ndarray) -> list:
        """Each stacked leaf as a view of `raw` (flat uint8): numpy where numpy has the dtype."""
        out: list[np.ndarray | torch.Tensor] = []
        for shape, np_dtype, offset, size, dtype in self._cuts:
            if np_dtype is not None and size:
                out.append(np.ndarray(shape, np_dtype, raw, offset))
            elif np_dtype is not None:
                out.append(np.empty(shape, np_dtype))  # no bytes to share
            elif not size:  # (torch cannot view an empty slice as a wider dtype)
                out.append(torch.empty(shape, dtype=dtype))
            else:
                out.append(torch.from_numpy(raw[offset:offset + size]).view(dtype).view(shape))
        return out

    def tensors(self, raw: np.ndarray) -> list:
        """The stacked leaves as zero-copy tensor views of `raw`.

        Every view keeps `raw` alive: the handle whose death returns a pooled
        buffer to its worker.
        """
        from_numpy = torch.from_numpy
        return [from_numpy(a) if type(a) is np.ndarray else a for a in self.arrays(raw)]

    def torch_views(self, buf: torch.Tensor) -> list:
        """Views of a flat uint8 tensor cut in torch (for pinned or non-CPU buffers)."""
        return [buf[off:off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for off, dtype, shape in zip(self.offsets, self.dtypes, self.shapes, strict=True)]


_LAYOUTS: dict = {}  # (treespec, num_tasks, default dtype, (type, dtype, shape) of each leaf) -> Layout
_MAX_LAYOUTS = 1024


def layout_of(treespec, leaves: list, num_tasks: int, spec=None) -> Layout:
    """The (cached) layout of a batch of `num_tasks` tasks whose task 0 has these leaves (of `spec`)."""
    parts = [treespec, num_tasks, torch.get_default_dtype()]
    for leaf in leaves:
        parts += (type(leaf), getattr(leaf, "dtype", None), getattr(leaf, "shape", None))
    key = tuple(parts)
    layout = _LAYOUTS.get(key)
    if layout is None:
        metas = [_leaf_meta(leaf, i, treespec, spec) for i, leaf in enumerate(leaves)]
        layout = Layout(treespec, [m[0] for m in metas], [(num_tasks,) + tuple(m[1]) for m in metas],
                         [m[2] for m in metas])
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


def _torch_dtype(leaf):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        if isinstance(leaf, int) and not isinstance(leaf, bool) and not _INT64[0] <= leaf <= _INT64[1]:
            return torch.int64  # (too large for it: reported as such by _diagnose)
        try:
            return torch.tensor(leaf).dtype
        except (TypeError, ValueError, RuntimeError):
            return f"a {type(leaf).__name__}"
    return _TORCH_DTYPE.get(dtype, dtype) if isinstance(dtype, np.dtype) else dtype


def _diagnose(spec, outs, err: BaseException | None = None, leaf: int | None = None) -> ValueError:
    """The error for the first task whose output differs from task 0's (or that breaks leaf `leaf`)."""
    first, treespec = optree.tree_flatten(outs[0])
    paths = optree.tree_paths(outs[0])
    for j in range(1, len(outs)):
        leaves, other = optree.tree_flatten(outs[j])
        if other != treespec:
            return _mismatch(spec, j, f"pytree structure {treespec} vs {other}")
        for path, a, b in zip(paths, first, leaves, strict=True):
            sa, sb = tuple(getattr(a, "shape", ())), tuple(getattr(b, "shape", ()))
            if sa != sb:
                return _mismatch(spec, j, f"leaf {path_str(path)} has shape {sa} vs {sb}")
            da, db = _torch_dtype(a), _torch_dtype(b)
            if da != db:
                return _mismatch(spec, j, f"leaf {path_str(path)} has dtype {da} vs {db}")
    why = "" if err is None else f" ({type(err).__name__}: {err})"
    if leaf is not None:
        column = [optree.tree_leaves(out)[leaf] for out in outs]
        for j, value in enumerate(column):
            if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
                return ValueError(f"{_where(spec)}leaf {path_str(paths[leaf])} of {_describe(spec, j)} is the int "
                                  f"{_short_int(value)}, outside torch's int64 range [-2**63, 2**63 - 1]; store "
                                  f"it as a float, split it into smaller ints, or leave it out of the task output.")
        return ValueError(f"{_where(spec)}could not stack leaf {path_str(paths[leaf])} of the task outputs{why}; "
                          f"every task of a batch must return arrays of one shape and dtype per leaf.")
    return ValueError(f"could not stack the task outputs of step {getattr(spec, 'step', '?')}{why}; "
                      f"every task of a batch must return arrays of one shape and dtype per leaf.")


def _as_tensor(leaf, dtype: torch.dtype) -> torch.Tensor:
    """A numpy leaf in a column of tensors: as a tensor, if numpy's dtype is torch's `dtype`."""
    if isinstance(leaf, (np.ndarray, np.generic)) and _TORCH_DTYPE.get(leaf.dtype) is dtype:
        if isinstance(leaf, np.ndarray) and leaf.flags.writeable:
            return torch.from_numpy(leaf)
        return torch.tensor(np.asarray(leaf))
    raise TypeError(f"dtype {getattr(leaf, 'dtype', type(leaf).__name__)} vs {dtype}")


def _plain(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, dtype=np.uint8)


def fill(outs: list, spec, alloc=_plain):
    """Stack task outputs into one flat uint8 buffer. Returns `(layout, raw)`.

    Task 0 is flattened once; every other task is cut along task 0's treespec
    (`flatten_up_to`: 0.3 µs a task against 2.3 µs for a full flatten), which
    fails on a structure that differs. Then per leaf one `concatenate` /
    `stack` / assignment writes the column straight into its place in the
    buffer. `alloc(nbytes)` returns the buffer as a flat uint8 numpy array.
    """
    leaves, treespec = optree.tree_flatten(outs[0])
    try:
        columns = list(zip(leaves, *[treespec.flatten_up_to(out) for out in outs[1:]], strict=True))
    except (ValueError, TypeError) as err:
        raise _diagnose(spec, outs) from err
    layout = layout_of(treespec, leaves, len(outs), spec)
    raw = alloc(layout.nbytes)
    i = None
    try:
        rows = zip(columns, layout.arrays(raw), layout.kinds, layout.shapes, leaves, strict=True)
        for i, (column, view, kind, shape, first) in enumerate(rows):  # noqa: B007 (i names the leaf on error)
            if kind == _ARRAY:
                for leaf in column:
                    if leaf.shape != first.shape:  # concatenate alone would not see it
                        raise ValueError(f"shape {leaf.shape} vs {first.shape}")
                np.concatenate(column, out=view.reshape((-1,) + shape[2:]), casting="no")
            elif kind == _TENSOR:
                dtype = first.dtype
                for leaf in column:
                    if leaf.dtype is not dtype:  # stack would cast; numpy arrays of that dtype are fine
                        column = [t if isinstance(t, torch.Tensor) and t.dtype is dtype else _as_tensor(t, dtype)
                                  for t in column]
                        break
                torch.stack(column, out=torch.from_numpy(view) if type(view) is np.ndarray else view)
            elif kind != _OTHER and len({type(leaf) for leaf in column}) == 1:
                view[...] = column  # numbers or numpy scalars of one type: exact
            else:  # mixed types, 0-d arrays: numpy's casting rules decide
                exact = isinstance(first, (np.ndarray, np.generic))
                np.stack(column, out=view, casting="no" if exact else "same_kind")
    except (ValueError, TypeError, RuntimeError, AttributeError, OverflowError) as err:
        raise _diagnose(spec, outs, err, i) from err
    return layout, raw


def unflatten(layout: Layout, leaves: list):
    """The batch pytree of `layout` with these leaves."""
    return optree.tree_unflatten(layout.treespec, leaves)


def batch(outs: list, spec) -> object:
    """Stack task outputs in this process: the batch pytree of tensors (views of one buffer)."""
    layout, raw = fill(outs, spec)
    return unflatten(layout, layout.tensors(raw))
