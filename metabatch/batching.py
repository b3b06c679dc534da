"""Exact and fast task-batching rules for norms, convolutions and pooling under `vmap`.

[`batching_rules`][metabatch.batching.batching_rules] is a context manager that
[`metabatch.maml.meta_loss`][] enters around its `vmap` over tasks. While it is
active, a few `torch.nn.functional` calls whose arguments are batched by `vmap` are
routed through metabatch's own rules:

* `batch_norm` (training mode), `layer_norm` and `instance_norm`: PyTorch's
  batching rules for their backward compute the weight gradient from the saved
  mean and inverse standard deviation, which are *non-differentiable* outputs of
  `native_batch_norm` / `native_layer_norm`. Differentiating the inner
  gradient again (second-order MAML) therefore drops the terms through the batch
  statistics: the meta-gradient is wrong (see `docs/sharp-bits.md`). metabatch
  folds the task dimension into the channels and calls the native kernels, whose
  double-backward formulas are right, or uses an exact mean/variance decomposition.
* `conv2d` (in the query pass, outside any inner `grad`) and `max_pool2d`:
  tasks are folded into channels (one grouped convolution over `[N, T*C, H, W]`
  in channels-last memory, one pooling call), which keeps every activation in
  one layout from layer to layer instead of transposing and copying it around
  each op, as the stock rules do, and is much faster on CPU. `Tensor.view` of
  a channels-last activation falls back to `reshape` when a view is impossible.

Calls whose arguments are not batched go straight to PyTorch.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["batching_rules"]

_aten = torch.ops.aten
_C = torch._C._functorch


# ------------------------------------------------------------------- task-batching rules
#
# Convention: a task-batched activation is held "channel-folded": physically
# [N, T*C, *spatial] (viewed as [N, T, C, *spatial] with batch dim 1), so that
# the stock kernels of conv (grouped), batch norm and pooling see T*C channels.
# _fold() brings any (tensor, bdim) there, as a view whenever the layout allows.


def _fold(x: torch.Tensor, bdim: int | None, t: int) -> torch.Tensor:
    """[.., T at bdim, ..] with logical shape [N, C, *sp] -> [N, T*C, *sp]."""
    if bdim is None:
        x = x.unsqueeze(1).expand(x.shape[0], t, *x.shape[1:])
    else:
        x = x.movedim(bdim, 1)
    return x.flatten(1, 2)


def _stack0(w: torch.Tensor | None, bdim: int | None, t: int) -> torch.Tensor | None:
    """A per-task leaf [T, C, ...] (or a shared [C, ...]) -> [T*C, ...]."""
    if w is None:
        return None
    if bdim is None:
        return w.repeat(t, *([1] * (w.dim() - 1)))
    return w.movedim(bdim, 0).flatten(0, 1)


def _unfold(y: torch.Tensor | None, t: int, dim: int = 1):
    if y is None:
        return None, None
    return y.unflatten(dim, (t, -1)), dim


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # Still batched by an outer vmap (nested vmaps): vmap cannot restride it.
    if x.dim() != 4 or _is_batched(x):
        return x
    return x.contiguous(memory_format=torch.channels_last)


class _Conv(torch.autograd.Function):
    """aten.convolution (not transposed) with a task-folding, channels-last vmap rule.

    Applied only when the innermost transform is a vmap (the query pass): the rule then
    dissolves it into a native grouped convolution, which the transforms and autograd levels
    below differentiate natively, so the Function itself is never differentiated.
    """

    @staticmethod
    def forward(x, w, b, stride, padding, dilation, groups):
        return _aten.convolution(x, w, b, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, gy):  # pragma: no cover - see the class docstring
        raise RuntimeError("metabatch.batching._Conv is applied only at a vmap level; please report this.")

    @staticmethod
    def vmap(info, in_dims, x, w, b, stride, padding, dilation, groups):
        t = info.batch_size
        xf = _channels_last(_fold(x, in_dims[0], t))
        wf = _channels_last(_stack0(w, in_dims[1], t))
        bf = _stack0(b, in_dims[2], t)
        y = _aten.convolution(xf, wf, bf, stride, padding, dilation, False, [0] * len(stride), groups * t)
        return _unfold(y, t)


class _BatchNorm(torch.autograd.Function):
    """Training-mode batch norm (batch statistics, no running stats) with a task-folding vmap rule."""

    @staticmethod
    def forward(x, w, b, eps):
        return _aten.native_batch_norm(x, w, b, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, eps = inputs
        _, mean, invstd = output
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.mark_non_differentiable(mean, invstd)
        ctx.eps = eps
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, gy, _gmean, _ginvstd):
        x, w, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(gy, x, w, mean, invstd, ctx.eps, ctx.has_bias)
        return gx, gw, gb, None

    @staticmethod
    def vmap(info, in_dims, x, w, b, eps):
        t = info.batch_size
        y, mean, invstd = _aten.native_batch_norm(
            _fold(x, in_dims[0], t), _stack0(w, in_dims[1], t), _stack0(b, in_dims[2], t),
            None, None, True, 0.0, eps)
        (y, dy), (mean, dm), (invstd, di) = _unfold(y, t), _unfold(mean, t, 0), _unfold(invstd, t, 0)
        return (y, mean, invstd), (dy, dm, di)


class _BatchNormBackward(torch.autograd.Function):
    """aten.native_batch_norm_backward (training mode) with a task-folding vmap rule."""

    @staticmethod
    def forward(gy, x, w, mean, invstd, eps, has_bias):
        affine = w is not None
        return _aten.native_batch_norm_backward(gy, x, w, None, None, mean, invstd, True, eps,
                                                [True, affine, has_bias])

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, w, _, _, eps, has_bias = inputs
        ctx.save_for_backward(gy, x, w)
        ctx.eps, ctx.has_bias = eps, has_bias

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        # Third order (rare): differentiate an exact mean/variance decomposition.
        gy, x, w = ctx.saved_tensors
        outs, vjp = torch.func.vjp(lambda gy, x, w: _bn_backward(gy, x, w, ctx.eps), gy, x, w)
        cotangents = tuple(torch.zeros_like(o) if g is None else g for g, o in zip((ggx, ggw, ggb), outs, strict=True))
        g_gy, g_x, g_w = vjp(cotangents)
        return g_gy, g_x, (g_w if w is not None else None), None, None, None, None

    @staticmethod
    def vmap(info, in_dims, gy, x, w, mean, invstd, eps, has_bias):
        t = info.batch_size
        affine = w is not None
        gx, gw, gb = _aten.native_batch_norm_backward(
            _fold(gy, in_dims[0], t), _fold(x, in_dims[1], t), _stack0(w, in_dims[2], t), None, None,
            _stack0(mean, in_dims[3], t), _stack0(invstd, in_dims[4], t), True, eps,
            [True, affine, has_bias])
        (gx, dx), (gw, dw), (gb, db) = _unfold(gx, t), _unfold(gw, t, 0), _unfold(gb, t, 0)
        return (gx, gw, gb), (dx, dw, db)


def _bn_backward(gy, x, w, eps):
    """Training-mode batch-norm backward (input, weight, bias grads) as plain differentiable ops."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    invstd = torch.rsqrt(x.var(dims, correction=0, keepdim=True) + eps)
    xhat = (x - mean) * invstd
    g = gy if w is None else gy * w.reshape(shape)
    gx = invstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
    return gx, (gy * xhat).sum(dims), gy.sum(dims)


class _MaxPool(torch.autograd.Function):
    """aten.max_pool2d_with_indices with a task-folding vmap rule."""

    @staticmethod
    def forward(x, kernel, stride, padding, dilation, ceil_mode):
        return _aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, *cfg = inputs
        ctx.save_for_backward(x, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.cfg = cfg

    @staticmethod
    def backward(ctx, gy, _gidx):
        x, idx = ctx.saved_tensors
        return (_MaxPoolBackward.apply(gy, x, idx, *ctx.cfg),) + (None,) * 5

    @staticmethod
    def vmap(info, in_dims, x, kernel, stride, padding, dilation, ceil_mode):
        t = info.batch_size
        y, idx = _aten.max_pool2d_with_indices(_fold(x, in_dims[0], t), kernel, stride, padding,
                                               dilation, ceil_mode)
        return (y.unflatten(1, (t, -1)), idx.unflatten(1, (t, -1))), (1, 1)


class _MaxPoolBackward(torch.autograd.Function):
    """aten.max_pool2d_with_indices_backward with a task-folding vmap rule."""

    @staticmethod
    def forward(gy, x, idx, kernel, stride, padding, dilation, ceil_mode):
        return _aten.max_pool2d_with_indices_backward(gy, x, kernel, stride, padding, dilation,
                                                      ceil_mode, idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, _, idx = inputs[:3]
        ctx.save_for_backward(idx)
        ctx.shape = gy.shape

    @staticmethod
    def backward(ctx, ggx):
        # Linear in gy: its transpose gathers the incoming gradient at the argmax positions.
        (idx,) = ctx.saved_tensors
        g_gy = ggx.flatten(-2).gather(-1, idx.flatten(-2)).reshape(ctx.shape)
        return (g_gy,) + (None,) * 7

    @staticmethod
    def vmap(info, in_dims, gy, x, idx, kernel, stride, padding, dilation, ceil_mode):
        t = info.batch_size
        gx = _aten.max_pool2d_with_indices_backward(
            _fold(gy, in_dims[0], t), _fold(x, in_dims[1], t), kernel, stride, padding, dilation,
            ceil_mode, _fold(idx, in_dims[2], t))
        return _unfold(gx, t)


def _is_batched(x) -> bool:
    """Whether a tensor carries a vmap batch dimension at any functorch level."""
    if not isinstance(x, torch.Tensor):
        return False
    while _C.maybe_get_level(x) != -1:
        if _C.is_batchedtensor(x):
            return True
        x = _C.get_unwrapped(x)
    return False


def _innermost():
    """The innermost functorch transform active now (a TransformType), or None."""
    top = _C.peek_interpreter_stack()
    return None if top is None else top.key()


_VMAP, _GRAD = _C.TransformType.Vmap, _C.TransformType.Grad


def _pair(v, name: str) -> list[int]:
    v = list(v) if isinstance(v, (tuple, list)) else [v, v]
    if len(v) == 1:
        v = v * 2
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    return v


def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    # Only the query pass (innermost transform a vmap) goes channels-last: under an inner grad
    # (the support pass) the stock rule is as fast and keeps the layout contiguous, which the
    # native batch-norm double backward wants.
    if (isinstance(padding, str) or input.dim() != 4 or not _state.channels_last
            or _innermost() != _VMAP or not (_is_batched(input) or _is_batched(weight))):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _Conv.apply(input, weight, bias, _pair(stride, "stride"), _pair(padding, "padding"),
                       _pair(dilation, "dilation"), groups)


def _max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                return_indices=False):
    if input.dim() != 4 or _innermost() not in (_VMAP, _GRAD) or not _is_batched(input):
        return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                            return_indices=return_indices)
    kernel = _pair(kernel_size, "kernel_size")
    stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) else _pair(
        stride, "stride")
    y, idx = _MaxPool.apply(input, kernel, stride, _pair(padding, "padding"), _pair(dilation, "dilation"),
                            ceil_mode)
    return (y, idx) if return_indices else y


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5):
    uses_batch_stats = training or running_mean is None or running_var is None
    if not uses_batch_stats or not any(_is_batched(t) for t in (input, weight, bias)):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    # Batch statistics of each task; running statistics are left untouched (a pure function).
    if _innermost() in (_VMAP, _GRAD):
        return _BatchNorm.apply(input, weight, bias, eps)[0]
    shape = (-1,) + (1,) * (input.dim() - 2)  # e.g. under jvp: the exact decomposition
    y = _normalize(input, (0, *range(2, input.dim())), eps)
    y = y if weight is None else y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _normalize(x, dims, eps):
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if not any(_is_batched(t) for t in (input, weight, bias)):
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    n = len((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape)
    y = _normalize(input, tuple(range(-n, 0)), eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                   use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats or not any(_is_batched(t) for t in (input, weight, bias)):
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                               momentum, eps)
    y = _normalize(input, tuple(range(2, input.dim())), eps)
    shape = (-1,) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _view(self, *shape, **kwargs):
    try:
        return torch.Tensor.view(self, *shape, **kwargs)
    except RuntimeError:
        # A channels-last activation cannot always be viewed as [N, -1]; copy instead.
        if kwargs or (len(shape) == 1 and isinstance(shape[0], torch.dtype)) or not _is_batched(self):
            raise
        return self.reshape(*shape)


def _contiguous_first(func):
    """Ops whose stock vmap rules reject (group_norm) or warn about (adaptive_avg_pool2d)
    a channels-last batched input: give them a contiguous one."""

    def rule(*args, **kwargs):
        args = [a.contiguous() if _is_batched(a) else a for a in args]
        return func(*args, **kwargs)

    return rule


_RULES = {
    torch.Tensor.view: _view,
    F.group_norm: _contiguous_first(F.group_norm),
    F.adaptive_avg_pool2d: _contiguous_first(F.adaptive_avg_pool2d),
    F.conv2d: _conv2d,
    F.max_pool2d: _max_pool2d,
    F.batch_norm: _batch_norm,
    F.layer_norm: _layer_norm,
    F.instance_norm: _instance_norm,
}


class _BatchingRules(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        rule = _RULES.get(func)
        if rule is None:
            return func(*args, **(kwargs or {}))
        return rule(*args, **(kwargs or {}))


class _State(threading.local):
    """Per-thread: whether the rules are installed, and the layout they use.

    Both attributes exist from each thread's first access on (`threading.local` runs
    `__init__` per thread): `torch.compile` guards on them, and an attribute that appeared
    only after the first call made every compiled meta-step compile twice.
    """

    def __init__(self):
        self.active = False
        self.channels_last = True


_state = _State()


@contextlib.contextmanager
def batching_rules(enabled: bool = True, *, channels_last: bool = True):
    """Route batched norm, conv and pooling calls through metabatch's exact rules.

    [`metabatch.maml.meta_loss`][] and the other task-batched functions of
    `metabatch.maml` enter this context themselves; enter it yourself when
    you call `torch.func.vmap` over tasks with your own code. Inside it, while
    vmapped, `F.batch_norm` in training mode uses each task's batch
    statistics and never updates running statistics, and the meta-gradient
    through `batch_norm`, `layer_norm` and `instance_norm` is exact (it is
    not with PyTorch's own batching rules: `docs/sharp-bits.md`).
    Nested uses are free: only the outermost one installs the rules, so
    `with batching_rules(channels_last=False): maml.meta_loss(...)` sets the layout
    for a `meta_loss` call.

    Args:
        enabled: `False` makes the context a no-op (to compare with stock PyTorch).
        channels_last: hold batched conv activations of the query pass channels-last
            (faster on CPU). `False` keeps them contiguous, for code that needs it.

    Examples:
        >>> import torch, metabatch as mb
        >>> bn = torch.nn.BatchNorm1d(2, track_running_stats=False)
        >>> x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
        >>> with mb.batching.batching_rules():
        ...     y = torch.func.vmap(bn)(x)
        >>> torch.allclose(y, torch.stack([bn(xi) for xi in x]), atol=1e-6)
        True
    """
    if not enabled or _state.active:
        yield
        return
    _state.active, _state.channels_last = True, bool(channels_last)
    try:
        with _BatchingRules():
            yield
    finally:
        _state.active, _state.channels_last = False, True
