"""Regression task families: sinusoids (Finn et al. 2017) and Gaussian-process functions.

Both follow the `sample_task(key, idx, n_ctx, n_tgt)` protocol of
`metabatch.task_loader` and return
`{"context": (x, y), "target": (x, y)}` with float32 arrays of shape
`(n, 1)`. Every random number comes from `key`; `idx` is ignored (the
space of functions is continuous, so a task has no natural index: the
`num_tasks` given to `metabatch.batch_specs` only sets its epoch
length and can be any positive int).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .. import _validate
from .. import random as _random

__all__ = ["GP", "gp", "sinusoid"]

_FINN_AMPLITUDE = (0.1, 5.0)
_FINN_PHASE = (0.0, math.pi)
_FINN_X = (-5.0, 5.0)


def sinusoid(key: _random.Key, idx: int, n_ctx: int, n_tgt: int, *,
             amplitude: tuple[float, float] = _FINN_AMPLITUDE, phase: tuple[float, float] = _FINN_PHASE,
             x_range: tuple[float, float] = _FINN_X, info: bool = False) -> dict:
    """One sine-wave regression task: `y = amplitude * sin(x + phase)`.

    The protocol of Finn et al. (2017, MAML): amplitude ~ U[0.1, 5], phase ~
    U[0, pi], inputs ~ U[-5, 5], no observation noise. Context and target
    points are independent draws on the same curve. The random stream (stable):
    `rng = numpy_rng(key)`; amplitude, then phase, then the `n_ctx + n_tgt`
    inputs, context first.

    Pass options to `metabatch.task_loader` with `functools.partial`
    (`partial(sinusoid, info=True)`), which stays picklable.

    Args:
        key: the task's key: it fixes the curve and the points.
        idx: ignored (every task is a fresh draw); any int.
        n_ctx: context (support) points.
        n_tgt: target (query) points.
        amplitude: the `(low, high)` range of the amplitude.
        phase: the `(low, high)` range of the phase.
        x_range: the `(low, high)` range of the inputs.
        info: also return `"info": {"amplitude": a, "phase": p}` (float32
            scalars), e.g. to plot the true curve.

    Returns:
        `{"context": (x, y), "target": (x, y)}`, float32 arrays of shapes
        `(n_ctx, 1)` and `(n_tgt, 1)`; plus `"info"` with `info=True`.

    Raises:
        TypeError: `n_ctx` / `n_tgt` are not ints, or a range is not a pair.
        ValueError: a size is negative or a range is empty.

    Examples:
        >>> import numpy as np, metabatch as mb
        >>> task = mb.tasks.sinusoid(mb.random.key(0), 0, n_ctx=5, n_tgt=10, info=True)
        >>> x, y = task["context"]
        >>> x.shape, y.dtype, task["target"][0].shape
        ((5, 1), dtype('float32'), (10, 1))
        >>> a, p = task["info"]["amplitude"], task["info"]["phase"]
        >>> bool(abs(y - a * np.sin(x + p)).max() < 1e-5)
        True
    """
    n_ctx, n_tgt = _validate.sizes(n_ctx, n_tgt, "sinusoid")
    if amplitude is not _FINN_AMPLITUDE:
        amplitude = _validate.interval(amplitude, "amplitude", "sinusoid", fixed_ok=False)
    if phase is not _FINN_PHASE:
        phase = _validate.interval(phase, "phase", "sinusoid", fixed_ok=False)
    if x_range is not _FINN_X:
        x_range = _validate.interval(x_range, "x_range", "sinusoid", fixed_ok=False)
    rng = _random.numpy_rng(key)
    amp = rng.uniform(amplitude[0], amplitude[1])
    ph = rng.uniform(phase[0], phase[1])
    x = rng.uniform(x_range[0], x_range[1], size=(n_ctx + n_tgt, 1)).astype(np.float32)
    y = (amp * np.sin(x + np.float32(ph))).astype(np.float32, copy=False)
    out: dict[str, Any] = {"context": (x[:n_ctx], y[:n_ctx]), "target": (x[n_ctx:], y[n_ctx:])}
    if info:
        out["info"] = {"amplitude": np.float32(amp), "phase": np.float32(ph)}
    return out


@dataclasses.dataclass(frozen=True)
class GP:
    """A picklable `sample_task` drawing 1-D functions from a Gaussian process.

    Make one with `gp`, which checks the arguments; the fields are
    those of `gp`, with ranges stored as `(low, high)` pairs.
    """

    length_scale: tuple
    output_scale: tuple
    noise: float
    x_range: tuple
    info: bool = False

    def __call__(self, key: _random.Key, idx: int, n_ctx: int, n_tgt: int) -> dict:
        """One GP regression task; see `gp`.

        Examples:
            >>> import metabatch as mb
            >>> task = mb.tasks.gp()(mb.random.key(0), 0, 3, 4)
            >>> task["context"][0].shape, task["target"][1].shape
            ((3, 1), (4, 1))
        """
        n_ctx, n_tgt = _validate.sizes(n_ctx, n_tgt, "gp")
        n = n_ctx + n_tgt
        rng = _random.numpy_rng(key)
        ls = self.length_scale[0]
        if self.length_scale[1] != ls:
            ls = rng.uniform(*self.length_scale)
        scale = self.output_scale[0]
        if self.output_scale[1] != scale:
            scale = rng.uniform(*self.output_scale)
        x = rng.uniform(self.x_range[0], self.x_range[1], size=(n, 1))
        z = rng.standard_normal((n, 1))
        sq = np.square((x - x.T) / ls)
        kernel = scale * scale * np.exp(-0.5 * sq)
        # Observation noise plus a relative jitter that keeps the Cholesky factor defined.
        kernel.flat[::n + 1] += self.noise * self.noise + 1e-6 * scale * scale
        y = np.linalg.cholesky(kernel) @ z
        x, y = x.astype(np.float32), y.astype(np.float32)
        out: dict[str, Any] = {"context": (x[:n_ctx], y[:n_ctx]), "target": (x[n_ctx:], y[n_ctx:])}
        if self.info:
            out["info"] = {"length_scale": np.float32(ls), "output_scale": np.float32(scale)}
        return out


def gp(length_scale: float | tuple[float, float] = 0.6, output_scale: float | tuple[float, float] = 1.0,
       noise: float = 0.02, x_range: tuple[float, float] = (-2.0, 2.0), *, info: bool = False) -> GP:
    """A task family of 1-D functions drawn from a Gaussian process (for neural processes).

    Each task draws `n_ctx + n_tgt` inputs `x ~ U[x_range]` and one joint
    sample `y ~ N(0, K + noise**2 I)` with the RBF kernel
    `K[i, j] = output_scale**2 * exp(-(x_i - x_j)**2 / (2 * length_scale**2))`:
    context and target points lie on the *same* function. The defaults are
    those of the conditional neural process paper (Garnelo et al. 2018).
    Context and target are disjoint; for the NP convention "targets include
    the context", concatenate them. The random stream (stable):
    `rng = numpy_rng(key)`; length scale and output scale (only those given
    as ranges), then the inputs, then the standard normals.

    Args:
        length_scale: the kernel's length scale (`> 0`), or a
            `(low, high)` range to draw one per task.
        output_scale: the function's standard deviation (`> 0`), or a range.
        noise: the standard deviation of Gaussian observation noise (`>= 0`).
        x_range: the `(low, high)` range of the inputs.
        info: also return `"info": {"length_scale", "output_scale"}` per task.

    Returns:
        A [`GP`][metabatch.tasks.GP], called as `GP(key, idx, n_ctx, n_tgt)`; it returns
        `{"context": (x, y), "target": (x, y)}` with float32 arrays of shape `(n, 1)`. It is
        picklable, so it works with any loader start method; `idx` is ignored.

    Raises:
        TypeError: an argument is not a number (or a pair of numbers).
        ValueError: a scale is not positive, the noise is negative, or a
            range is empty.

    Examples:
        >>> import metabatch as mb
        >>> sample_task = mb.tasks.gp(length_scale=(0.1, 1.0), noise=0.0)
        >>> specs = mb.batch_specs(seed=0, num_tasks=1, batch_size=4, n_ctx=(3, 10), n_tgt=20,
        ...                        num_batches=1)
        >>> batch = next(iter(mb.task_loader(sample_task, specs)))
        >>> tuple(batch["target"][1].shape)
        (4, 20, 1)
    """
    return GP(length_scale=_validate.interval(length_scale, "length_scale", "gp", positive=True),
              output_scale=_validate.interval(output_scale, "output_scale", "gp", positive=True),
              noise=_validate.number(noise, "noise", "gp", low=0.0),
              x_range=_validate.interval(x_range, "x_range", "gp", fixed_ok=False),
              info=bool(info))
