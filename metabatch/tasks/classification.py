"""N-way K-shot classification over any array of classes.

:func:`classification` turns an array ``[num_classes, examples_per_class,
...]`` (Omniglot, mini-ImageNet features, your own data) into a picklable
``sample_task`` for :func:`metabatch.task_loader`. A task picks ``ways``
classes, gives them the labels ``0 .. ways-1`` in the order drawn (so which
class gets which label is random), and splits ``n_ctx + n_tgt`` distinct
examples of each class into ``n_ctx`` support (context) and ``n_tgt`` query
(target) examples per class.
"""

from __future__ import annotations

import dataclasses
import operator

import numpy as np
import torch

from .. import random as _random
from .. import _validate

__all__ = ["Classification", "classification"]


def _as_array(classes, fn: str) -> np.ndarray:
    """The classes as a read-only numpy view (no copy where possible)."""
    if isinstance(classes, torch.Tensor):
        classes = classes.detach().cpu().numpy()
    elif not isinstance(classes, np.ndarray):
        raise TypeError(f"{fn}(): classes must be a numpy array or a torch tensor of shape "
                        f"[num_classes, examples_per_class, ...], got {type(classes).__name__}.")
    if not (classes.dtype == np.uint8 or classes.dtype == np.bool_
            or np.issubdtype(classes.dtype, np.floating)):
        raise TypeError(f"{fn}(): classes has dtype {classes.dtype}; use uint8 images (0..255, scaled "
                        f"to [0, 1]), bool, or floating point (used as is), e.g. classes.astype(np.float32).")
    view = classes.view()
    view.flags.writeable = False
    return view


def _to_float(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 [0, 1]; bool -> 0/1; floats -> float32 (always a new array)."""
    out = images.astype(np.float32)
    if images.dtype == np.uint8:
        out /= np.float32(255)
    return out


def _rot90(images: np.ndarray, k: int) -> np.ndarray:
    """``np.rot90(images, k, axes=(-2, -1))`` as a view, without its per-call overhead."""
    if k == 1:
        return images[..., ::-1].swapaxes(-1, -2)
    if k == 2:
        return images[..., ::-1, ::-1]
    return images.swapaxes(-1, -2)[..., ::-1]


def _item_shape(shape: tuple, channel_dim: bool) -> tuple:
    return (1,) + shape if channel_dim and len(shape) == 2 else shape


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Classification:
    """A picklable N-way K-shot ``sample_task``; make one with :func:`classification`.

    Attributes:
        classes: the read-only class array ``[num_classes, examples_per_class, ...]``.
        ways: classes per task (N).
        rotate: give each class of a task a random multiple of 90 degrees.
        shuffle: shuffle the rows of the context and of the target set.
        channel_dim: give 2-D examples a channel dimension: ``[..., 1, H, W]``.
        info: also return the drawn classes and rotations.
    """

    classes: np.ndarray
    ways: int
    rotate: bool = False
    shuffle: bool = False
    channel_dim: bool = True
    info: bool = False

    def __repr__(self):
        return (f"Classification(classes=<{self.classes.dtype} array {tuple(self.classes.shape)}>, "
                f"ways={self.ways}, rotate={self.rotate}, shuffle={self.shuffle}, "
                f"channel_dim={self.channel_dim}, info={self.info})")

    def __call__(self, key: _random.Key, idx: int, n_ctx: int, n_tgt: int) -> dict:
        """One task; see :func:`classification`.

        Examples:
            >>> import numpy as np, metabatch as mb
            >>> sample_task = mb.tasks.classification(np.zeros((10, 4, 3), np.float32), ways=2)
            >>> x, y = sample_task(mb.random.key(0), 0, 1, 2)["target"]
            >>> x.shape, y.tolist()
            ((4, 3), [0, 0, 1, 1])
        """
        n_ctx, n_tgt = _validate.sizes(n_ctx, n_tgt, "classification")
        num_classes, per_class = self.classes.shape[:2]
        shots = n_ctx + n_tgt
        if shots > per_class:
            raise ValueError(f"classification(): n_ctx + n_tgt = {n_ctx} + {n_tgt} = {shots} examples "
                             f"per class, but each class has only {per_class}; lower n_ctx / n_tgt "
                             f"in batch_specs.")
        ways = self.ways
        rng = _random.numpy_rng(key)
        chosen = rng.choice(num_classes, ways, replace=False)
        examples = rng.random((ways, per_class)).argsort(axis=1)  # a random permutation per class
        turns = rng.integers(0, 4, size=ways) if self.rotate else np.zeros(ways, np.int64)
        raw = self.classes[chosen[:, None], examples[:, :shots]]  # (ways, shots, *item): a copy
        if self.rotate:
            for w, k in enumerate(turns.tolist()):
                if k:  # numpy copies an overlapping source before assigning it
                    raw[w] = _rot90(raw[w], k)
        item = _item_shape(raw.shape[2:], self.channel_dim)
        ctx_x = _to_float(raw[:, :n_ctx]).reshape((ways * n_ctx,) + item)
        tgt_x = _to_float(raw[:, n_ctx:]).reshape((ways * n_tgt,) + item)
        ctx_y = np.repeat(np.arange(ways, dtype=np.int64), n_ctx)
        tgt_y = np.repeat(np.arange(ways, dtype=np.int64), n_tgt)
        if self.shuffle:
            pc, pt = rng.permutation(ways * n_ctx), rng.permutation(ways * n_tgt)
            ctx_x, ctx_y, tgt_x, tgt_y = ctx_x[pc], ctx_y[pc], tgt_x[pt], tgt_y[pt]
        task = {"context": (ctx_x, ctx_y), "target": (tgt_x, tgt_y)}
        if self.info:
            task["info"] = {"classes": chosen.astype(np.int64), "rotations": turns.astype(np.int64)}
        return task


def classification(classes: np.ndarray | torch.Tensor, ways: int, *, rotate: bool = False,
                   shuffle: bool = False, channel_dim: bool = True, info: bool = False) -> Classification:
    """An N-way K-shot classification task family over an array of classes.

    A task draws ``ways`` distinct classes (label ``l`` is the ``l``-th class
    drawn, so the class-to-label map is random) and ``n_ctx + n_tgt``
    distinct examples of each: ``n_ctx`` go to the context (support) set and
    ``n_tgt`` to the target (query) set. Rows are grouped by label
    (``[0]*n_ctx + [1]*n_ctx + ...``) unless ``shuffle=True``.

    With ``rotate=True`` each drawn class gets one random rotation by
    ``k * 90`` degrees, ``k`` in ``{0, 1, 2, 3}``, applied to all its context
    and target images: the standard Omniglot augmentation, in which a rotated
    character acts as a new class (as in Finn et al. 2017, a task never holds
    one class twice, even in two rotations).

    ``idx`` is ignored: the key alone picks the classes, examples, rotations
    and order. An N-way task space has no small natural index, so the
    ``num_tasks`` of :func:`metabatch.batch_specs` only sets its epoch length
    (any value works; ``num_classes`` is a fine choice). For a fixed
    evaluation set, fix the seed: ``batch_specs(seed=1, num_tasks=600,
    batch_size=b, ..., num_batches=600 // b)`` gives the same 600 tasks every run.

    Memory: the factory keeps a read-only *view* of ``classes`` (no copy).
    With ``fork`` workers (the Linux default) the array is shared
    copy-on-write and never copied; with ``spawn`` / ``forkserver`` the
    sample_task, array included, is pickled once per worker.

    Args:
        classes: a numpy array or tensor ``[num_classes, examples_per_class,
            *item]``; uint8 data (images 0..255) is scaled to float32
            ``[0, 1]``, bool data becomes 0/1, floating data is only cast to
            float32. ``item`` is ``(H, W)`` or ``(C, H, W)`` for images, or
            ``(D,)`` for feature vectors.
        ways: classes per task (N), at most ``num_classes``.
        rotate: random 90-degree rotations per class (needs square images).
        shuffle: shuffle the rows of the context set and of the target set
            (for sequence models; MAML needs no shuffling).
        channel_dim: give 2-D examples ``(H, W)`` a channel dimension, so that
            images come out ``[N * n, 1, H, W]`` as conv nets expect; other
            item shapes are returned as they are.
        info: also return ``"info": {"classes": int64[ways], "rotations":
            int64[ways]}``: the class indices behind labels ``0 .. ways-1`` and
            their quarter turns.

    Returns:
        A :class:`Classification` ``sample_task(key, idx, n_ctx, n_tgt) ->
        {"context": (x, y), "target": (x, y)}`` with float32 ``x`` of shape
        ``[ways * n_ctx, *item]`` (resp. ``n_tgt``) and int64 labels ``y``.

    Raises:
        TypeError: ``classes`` is not an array/tensor of uint8, bool or float.
        ValueError: ``classes`` has fewer than 3 dimensions, ``ways`` is out of
            range, or ``rotate`` is asked for non-square or 1-D examples. A task
            asking for more than ``examples_per_class`` examples raises at call time.

    Examples:
        >>> import numpy as np, metabatch as mb
        >>> images = np.arange(6 * 3 * 2 * 2, dtype=np.uint8).reshape(6, 3, 2, 2)  # 6 classes
        >>> sample_task = mb.tasks.classification(images, ways=3, rotate=True)
        >>> task = sample_task(mb.random.key(0), 0, n_ctx=1, n_tgt=2)
        >>> x, y = task["context"]
        >>> x.shape, x.dtype, y.tolist()
        ((3, 1, 2, 2), dtype('float32'), [0, 1, 2])
        >>> task["target"][1].tolist()
        [0, 0, 1, 1, 2, 2]
    """
    fn = "classification"
    array = _as_array(classes, fn)
    if array.ndim < 3:
        raise ValueError(f"{fn}(): classes must have shape [num_classes, examples_per_class, ...] "
                         f"with at least one item dimension, got shape {tuple(array.shape)}; for "
                         f"scalar features use classes[..., None].")
    if isinstance(ways, bool):
        raise TypeError(f"{fn}(): ways must be an int, got {ways!r}.")
    try:
        ways = operator.index(ways)
    except TypeError:
        raise TypeError(f"{fn}(): ways must be an int, got {ways!r}.") from None
    if not 1 <= ways <= array.shape[0]:
        raise ValueError(f"{fn}(): ways={ways} must lie in [1, num_classes={array.shape[0]}].")
    if array.shape[1] < 1:
        raise ValueError(f"{fn}(): classes has no examples (shape {tuple(array.shape)}).")
    if rotate:
        item = array.shape[2:]
        if len(item) < 2 or item[-1] != item[-2]:
            raise ValueError(f"{fn}(): rotate=True needs square images (..., H, H), but the examples "
                             f"have shape {tuple(item)}; pass rotate=False or crop/resize them.")
    return Classification(array, ways, rotate=bool(rotate), shuffle=bool(shuffle),
                          channel_dim=bool(channel_dim), info=bool(info))
