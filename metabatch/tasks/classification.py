"""N-way K-shot classification over any array of classes.

`classification` turns an array `[num_classes, examples_per_class,
...]` (Omniglot, mini-ImageNet features, your own data) into a picklable
`sample_task` for `metabatch.task_loader`. A task picks `ways`
classes, gives them the labels `0 .. ways-1` in the order drawn (so which
class gets which label is random), and splits `n_ctx + n_tgt` distinct
examples of each class into `n_ctx` support (context) and `n_tgt` query
(target) examples per class.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, cast

import numpy as np
import torch

from .. import _validate
from .. import random as _random
from . import _common

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


def _rot90(images: np.ndarray, k: int) -> np.ndarray:
    """`np.rot90(images, k, axes=(-2, -1))` as a view, without its per-call overhead."""
    if k == 1:
        return images[..., ::-1].swapaxes(-1, -2)
    if k == 2:
        return images[..., ::-1, ::-1]
    return images.swapaxes(-1, -2)[..., ::-1]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Classification:
    """A picklable N-way K-shot `sample_task`; make one with `classification`.

    Attributes:
        classes: the read-only class array `[num_classes, examples_per_class, ...]`,
            or, with `offsets`, the examples `[num_examples, ...]`.
        ways: classes per task (N).
        rotate: give each class of a task a random multiple of 90 degrees.
        shuffle: shuffle the rows of the context and of the target set.
        channel_dim: give 2-D examples a channel dimension: `[..., 1, H, W]`.
        info: also return the drawn classes and rotations.
        offsets: `None`, or int64 `[num_classes + 1]`: class `c` is rows
            `offsets[c]:offsets[c + 1]` of `order` (of `classes` when
            `order` is `None`).
        order: `None`, or int64 `[num_examples]`: the rows of `classes` sorted by label.
        labels: `None`, or int64 `[num_classes]`: the label value of each class.
    """

    classes: np.ndarray
    ways: int
    rotate: bool = False
    shuffle: bool = False
    channel_dim: bool = True
    info: bool = False
    offsets: np.ndarray | None = None
    order: np.ndarray | None = None
    labels: np.ndarray | None = None

    def __repr__(self):
        ragged = "" if self.offsets is None else f", labels=<{len(self.offsets) - 1} classes>"
        return (f"Classification(classes=<{self.classes.dtype} array {tuple(self.classes.shape)}>{ragged}, "
                f"ways={self.ways}, rotate={self.rotate}, shuffle={self.shuffle}, "
                f"channel_dim={self.channel_dim}, info={self.info})")

    def _draw(self, rng: np.random.Generator, n_ctx: int, n_tgt: int) -> tuple:
        """`(chosen classes, rows [ways, shots] to gather, their label values)`."""
        shots, ways = n_ctx + n_tgt, self.ways
        if self.offsets is None:
            num_classes, per_class = self.classes.shape[:2]
            if shots > per_class:
                raise ValueError(f"classification(): n_ctx + n_tgt = {n_ctx} + {n_tgt} = {shots} examples "
                                 f"per class, but each class has only {per_class}; lower n_ctx / n_tgt "
                                 f"in batch_specs.")
            chosen = rng.choice(num_classes, ways, replace=False)
            examples = rng.random((ways, per_class)).argsort(axis=1)  # a random permutation per class
            return chosen, (chosen[:, None], examples[:, :shots]), chosen
        counts = np.diff(self.offsets)
        labels = cast(np.ndarray, self.labels)  # set together with offsets
        if shots > counts.min():
            fewest = int(counts.argmin())
            raise ValueError(f"classification(): n_ctx + n_tgt = {n_ctx} + {n_tgt} = {shots} examples per "
                             f"class, but class {int(labels[fewest])} has only {int(counts[fewest])} "
                             f"(the fewest); lower n_ctx / n_tgt in batch_specs, or drop the small classes.")
        chosen = rng.choice(len(counts), ways, replace=False)
        starts = self.offsets[chosen]
        # one random permutation per class, drawn as the rectangular case draws it (same stream when
        # every class has the same size)
        rows = np.stack([rng.random(int(n)).argsort()[:shots] for n in counts[chosen]]) + starts[:, None]
        if self.order is not None:
            rows = self.order[rows]
        return chosen, rows, labels[chosen]

    def __call__(self, key: _random.Key, idx: int, n_ctx: int, n_tgt: int) -> dict:
        """One task; see `classification`.

        Examples:
            >>> import numpy as np, metabatch as mb
            >>> sample_task = mb.tasks.classification(np.zeros((10, 4, 3), np.float32), ways=2)
            >>> x, y = sample_task(mb.random.key(0), 0, 1, 2)["target"]
            >>> x.shape, y.tolist()
            ((4, 3), [0, 0, 1, 1])
        """
        n_ctx, n_tgt = _validate.sizes(n_ctx, n_tgt, "classification")
        ways = self.ways
        rng = _random.numpy_rng(key)
        _, rows, names = self._draw(rng, n_ctx, n_tgt)
        turns = rng.integers(0, 4, size=ways) if self.rotate else np.zeros(ways, np.int64)
        raw = np.asarray(self.classes[rows])  # (ways, shots, *item): a copy (a gather from a memory map)
        if self.rotate:
            for w, k in enumerate(turns.tolist()):
                if k:  # numpy copies an overlapping source before assigning it
                    raw[w] = _rot90(raw[w], k)
        item = _common.item_shape(raw.shape[2:], self.channel_dim)
        ctx_x = _common.to_float(raw[:, :n_ctx]).reshape((ways * n_ctx,) + item)
        tgt_x = _common.to_float(raw[:, n_ctx:]).reshape((ways * n_tgt,) + item)
        ctx_y = np.repeat(np.arange(ways, dtype=np.int64), n_ctx)
        tgt_y = np.repeat(np.arange(ways, dtype=np.int64), n_tgt)
        if self.shuffle:
            pc, pt = rng.permutation(ways * n_ctx), rng.permutation(ways * n_tgt)
            ctx_x, ctx_y, tgt_x, tgt_y = ctx_x[pc], ctx_y[pc], tgt_x[pt], tgt_y[pt]
        task: dict[str, Any] = {"context": (ctx_x, ctx_y), "target": (tgt_x, tgt_y)}
        if self.info:
            task["info"] = {"classes": names.astype(np.int64), "rotations": turns.astype(np.int64)}
        return task


def classification(classes: np.ndarray | torch.Tensor, ways: int, *, rotate: bool = False,
                   shuffle: bool = False, channel_dim: bool = True, info: bool = False,
                   labels: np.ndarray | torch.Tensor | None = None) -> Classification:
    """An N-way K-shot classification task family over an array of classes.

    A task draws `ways` distinct classes (label `l` is the `l`-th class
    drawn, so the class-to-label map is random) and `n_ctx + n_tgt`
    distinct examples of each: `n_ctx` go to the context (support) set and
    `n_tgt` to the target (query) set. Rows are grouped by label
    (`[0]*n_ctx + [1]*n_ctx + ...`) unless `shuffle=True`.

    Classes of different sizes (tiered-ImageNet, your own data) come as a
    flat array of examples plus `labels`, one int per example: the classes
    are the distinct label values. With equal class sizes and sorted labels
    this draws exactly the tasks of the `[num_classes, per_class, ...]` form.

    With `rotate=True` each drawn class gets one random rotation by
    `k * 90` degrees, `k` in `{0, 1, 2, 3}`, applied to all its context
    and target images: the standard Omniglot augmentation, in which a rotated
    character acts as a new class (as in Finn et al. 2017, a task never holds
    one class twice, even in two rotations).

    `idx` is ignored: the key alone picks the classes, examples, rotations
    and order. An N-way task space has no small natural index, so the
    `num_tasks` of `metabatch.batch_specs` only sets its epoch length
    (any value works; `num_classes` is a fine choice). For a fixed
    evaluation set, fix the seed: `batch_specs(seed=1, num_tasks=600,
    batch_size=b, ..., num_batches=600 // b)` gives the same 600 tasks every run.

    Memory: the factory keeps a read-only *view* of `classes` (no copy).
    With `fork` workers (the Linux default) the array is shared
    copy-on-write and never copied. With `spawn` / `forkserver` the
    sample_task is pickled once per worker: an ordinary array travels by
    value (a copy per worker), a `metabatch.tasks.MmapArray` (what the
    dataset readers return, or `metabatch.tasks.mmap_array` makes) as a
    reference to its file, which every worker maps and shares.

    Args:
        classes: a numpy array or tensor `[num_classes, examples_per_class,
            *item]`, or with `labels`, `[num_examples, *item]`; uint8
            data (images 0..255) is scaled to float32 `[0, 1]`, bool data
            becomes 0/1, floating data is only cast to float32. `item` is
            `(H, W)` or `(C, H, W)` for images, or `(D,)` for feature
            vectors.
        ways: classes per task (N), at most the number of classes.
        rotate: random 90-degree rotations per class (needs square images).
        shuffle: shuffle the rows of the context set and of the target set
            (for sequence models; MAML needs no shuffling).
        channel_dim: give 2-D examples `(H, W)` a channel dimension, so that
            images come out `[N * n, 1, H, W]` as conv nets expect; other
            item shapes are returned as they are.
        info: also return `"info": {"classes": int64[ways], "rotations":
            int64[ways]}`: the classes behind labels `0 .. ways-1` (their
            index along `classes`' first axis, or with `labels`, their
            label value) and their quarter turns.
        labels: `None`, or ints `[num_examples]` (a numpy array or tensor):
            the class of each example of the flat `classes`. Sorted labels
            cost nothing; otherwise the factory keeps a sorting index (8
            bytes per example).

    Returns:
        A `Classification` `sample_task(key, idx, n_ctx, n_tgt) ->
        {"context": (x, y), "target": (x, y)}` with float32 `x` of shape
        `[ways * n_ctx, *item]` (resp. `n_tgt`) and int64 labels `y`.

    Raises:
        TypeError: `classes` is not an array/tensor of uint8, bool or float,
            or `labels` is not an array of ints.
        ValueError: `classes` has too few dimensions, `labels` does not
            have one entry per example, `ways` is out of range, or `rotate`
            is asked for non-square or 1-D examples. A task asking for more
            examples than a class has raises at call time.

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

        Classes of different sizes: a flat array and a label per example.

        >>> features = np.arange(9, dtype=np.float32)[:, None]       # 9 examples, 1 feature each
        >>> labels = np.array([7, 7, 7, 7, 2, 2, 5, 5, 5])            # 3 classes of 4, 2 and 3 examples
        >>> task = mb.tasks.classification(features, ways=2, labels=labels, info=True)(mb.random.key(0), 0, 1, 1)
        >>> task["info"]["classes"].tolist(), task["context"][0].ravel().tolist()
        ([7, 2], [1.0, 4.0])
    """
    fn = "classification"
    array = _as_array(classes, fn)
    offsets = order = values = None
    if labels is None:
        if array.ndim < 3:
            raise ValueError(f"{fn}(): classes must have shape [num_classes, examples_per_class, ...] "
                             f"with at least one item dimension, got shape {tuple(array.shape)}; for "
                             f"scalar features use classes[..., None] (or pass labels= for a flat array "
                             f"[num_examples, ...] of examples).")
        num_classes = array.shape[0]
        if array.shape[1] < 1:
            raise ValueError(f"{fn}(): classes has no examples (shape {tuple(array.shape)}).")
        item = array.shape[2:]
    else:
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
            what = f"an array of {labels.dtype}" if isinstance(labels, np.ndarray) else type(labels).__name__
            raise TypeError(f"{fn}(): labels must be an int array [num_examples] (numpy or torch), got {what}.")
        if array.ndim < 2:
            raise ValueError(f"{fn}(): with labels=, classes must have shape [num_examples, ...] with at "
                             f"least one item dimension, got shape {tuple(array.shape)}; for scalar "
                             f"features use classes[:, None].")
        if labels.shape != (array.shape[0],):
            raise ValueError(f"{fn}(): labels must have one entry per example: shape ({array.shape[0]},), "
                             f"got {tuple(labels.shape)}.")
        if labels.size and np.all(labels[1:] >= labels[:-1]):
            values, counts = np.unique(labels, return_counts=True)
        else:
            order = np.argsort(labels, kind="stable").astype(np.int64)
            values, counts = np.unique(labels, return_counts=True)
        values = values.astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        num_classes = len(values)
        item = array.shape[1:]
        if num_classes == 0:
            raise ValueError(f"{fn}(): classes has no examples (shape {tuple(array.shape)}).")
    if isinstance(ways, bool):
        raise TypeError(f"{fn}(): ways must be an int, got {ways!r}.")
    try:
        ways = operator.index(ways)
    except TypeError:
        raise TypeError(f"{fn}(): ways must be an int, got {ways!r}.") from None
    if not 1 <= ways <= num_classes:
        raise ValueError(f"{fn}(): ways={ways} must lie in [1, num_classes={num_classes}].")
    if rotate and (len(item) < 2 or item[-1] != item[-2]):
        raise ValueError(f"{fn}(): rotate=True needs square images (..., H, H), but the examples "
                         f"have shape {tuple(item)}; pass rotate=False or crop/resize them.")
    return Classification(array, ways, rotate=bool(rotate), shuffle=bool(shuffle),
                          channel_dim=bool(channel_dim), info=bool(info), offsets=offsets, order=order,
                          labels=values)
