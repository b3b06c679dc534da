"""The bridge from `nn.Module` to pure functions.

[`params`][metabatch.nn.params] and [`objective`][metabatch.nn.objective] turn a module into the
`(params, data)` functions that `metabatch.maml` consumes: parameters are an explicit
argument, buffers are read from the module (and copied, so that no call ever
mutates them), and the module runs through `torch.func.functional_call`.
Any `torch.optim` optimizer then takes the outer step on `module.parameters()`.

The exact task-batching rules for norms, convolutions and pooling live in
`metabatch.batching`; `metabatch.nn.batching_rules` is the same function.

Example:
    >>> import torch, metabatch as mb
    >>> net = torch.nn.Linear(3, 2)
    >>> f = mb.nn.objective(net, torch.nn.functional.mse_loss)
    >>> p = mb.nn.params(net)
    >>> x, y = torch.ones(4, 3), torch.zeros(4, 2)
    >>> torch.allclose(f(p, (x, y)), torch.nn.functional.mse_loss(net(x), y))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .batching import batching_rules as batching_rules  # the documented alias: an explicit re-export

__all__ = ["accuracy", "functional", "objective", "params"]  # (batching_rules: see metabatch.batching)


# --------------------------------------------------------------------------- the bridge


def _check_module(module, fn: str) -> None:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{fn}() expects a torch.nn.Module, got {type(module).__name__}; "
                        f"for plain functions pass them to metabatch.maml directly.")


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `module` as a `{name: parameter}` dict.

    The values are the module's own `nn.Parameter` objects, so a loss built
    from them back-propagates into `module.parameters()` and any
    `torch.optim` optimizer can take the step. Parameters with
    `requires_grad=False` are left out (they are read from the module).

    Args:
        module: any `torch.nn.Module`.

    Returns:
        A dict in `named_parameters()` order.

    Raises:
        TypeError: if `module` is not an `nn.Module`.

    Examples:
        >>> import torch, metabatch as mb
        >>> sorted(mb.nn.params(torch.nn.Linear(2, 1)))
        ['bias', 'weight']
    """
    _check_module(module, "params")
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def functional(module: torch.nn.Module) -> Callable[..., Any]:
    """`module` as a pure function `apply(params, *args, **kwargs)`.

    `params` is a dict from parameter names to tensors (as returned by
    [`params`][metabatch.nn.params], or adapted versions of it). Parameters missing from it
    (frozen ones) and buffers are read from the module at call time; buffers
    are copied first, so that batch norm's running statistics and counters are
    never changed by the call. The call goes through
    `torch.func.functional_call(..., strict=True)`.

    Args:
        module: any `torch.nn.Module`.

    Returns:
        `apply(params, *args, **kwargs)` returning what `module(*args, **kwargs)` returns.

    Raises:
        TypeError: if `module` is not an `nn.Module`.
        ValueError: (when called) if `params` names a tensor the module does not have.

    Examples:
        >>> import torch, metabatch as mb
        >>> net = torch.nn.Linear(2, 1)
        >>> apply = mb.nn.functional(net)
        >>> p = {k: torch.zeros_like(v) for k, v in mb.nn.params(net).items()}
        >>> apply(p, torch.ones(3, 2)).tolist()
        [[0.0], [0.0], [0.0]]
    """
    _check_module(module, "functional")
    names = {k for k, _ in module.named_parameters()} | {k for k, _ in module.named_buffers()}

    def apply(params, *args, **kwargs):
        if not isinstance(params, dict):
            raise TypeError(f"apply(params, ...): params must be a dict {{name: tensor}} as given by "
                            f"metabatch.nn.params(module), got {type(params).__name__}.")
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"apply(params, ...): {unknown} are not parameters or buffers of "
                             f"{type(module).__name__}; valid names: {sorted(names)}.")
        tensors = {k: p for k, p in module.named_parameters() if k not in params}
        tensors.update({k: b.clone() for k, b in module.named_buffers()})
        tensors.update(params)
        return torch.func.functional_call(module, tensors, args, kwargs, strict=True)

    return apply


def objective(module: torch.nn.Module, fn: Callable[[Any, Any], torch.Tensor]) -> Callable:
    """A per-task function `f(params, data) = fn(module(params; inputs), targets)`.

    `data` is a tuple `(inputs, targets)` (more items are passed as extra
    positional inputs: `(x1, x2, ..., targets)`). Use it for the loss given
    to [metabatch.maml.meta_loss][] and for metrics such as [`accuracy`][metabatch.nn.accuracy].

    Args:
        module: the model.
        fn: `fn(outputs, targets) -> scalar tensor`, e.g. `F.cross_entropy`.

    Returns:
        `f(params, data) -> scalar tensor`.

    Raises:
        TypeError: if `module` is not an `nn.Module` or `fn` is not callable;
            (when called) if `data` is not a tuple or list of at least two items.

    Examples:
        >>> import torch, metabatch as mb
        >>> net = torch.nn.Linear(2, 3)
        >>> acc = mb.nn.objective(net, mb.nn.accuracy)
        >>> float(acc(mb.nn.params(net), (torch.zeros(4, 2), net.bias.argmax().repeat(4))))
        1.0
    """
    _check_module(module, "objective")
    if not callable(fn):
        raise TypeError(f"objective(module, fn): fn must be callable as fn(outputs, targets), "
                        f"got {type(fn).__name__}.")
    apply = functional(module)

    def f(params, data):
        if not isinstance(data, (tuple, list)) or len(data) < 2:
            raise TypeError(f"objective: data must be a tuple (inputs, targets), got "
                            f"{type(data).__name__}" + (f" of length {len(data)}" if isinstance(
                                data, (tuple, list)) else "") + ".")
        return fn(apply(params, *data[:-1]), data[-1])

    return f


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max over the last dimension equals `targets`.

    Examples:
        >>> import torch, metabatch as mb
        >>> float(mb.nn.accuracy(torch.tensor([[0., 1.], [1., 0.]]), torch.tensor([1, 1])))
        0.5
    """
    return (logits.argmax(-1) == targets).to(logits.dtype).mean()
