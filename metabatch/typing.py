"""Type aliases used across metabatch's signatures.

These are ordinary `typing` aliases, for readers, type checkers and the API
reference; nothing checks them at run time (the functions validate their
arguments themselves).

Examples:
    >>> import torch
    >>> from metabatch.typing import PyTree, Rate
    >>> params: PyTree = {"w": torch.zeros(3), "b": [torch.zeros(())]}
    >>> lr: Rate = 0.1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import optree.typing
import torch

__all__ = ["LossFn", "Mask", "PyTree", "Rate"]

PyTree: TypeAlias = optree.typing.PyTree[torch.Tensor]
"""A nest of tuples, lists, dicts and NamedTuples whose leaves are tensors, as `optree` flattens it
(`optree.typing.PyTree[torch.Tensor]`; `None` is an empty subtree).

Parameters (`metabatch.nn.params(model)` is a `{name: tensor}` dict), a task's data (`(x, y)`)
and a batch of tasks (every leaf with a leading task dimension) are pytrees. optree orders dict
leaves by sorted key; metabatch only ever pairs two trees by structure, never by leaf order.
"""

Rate: TypeAlias = float | torch.Tensor | PyTree
"""An inner learning rate: a number, a 0-d tensor, or a pytree like the parameters (one rate per leaf:
Meta-SGD), whose leaves are numbers or tensors broadcastable to their parameter. Tensors that
require grad receive the meta-gradient."""

Mask: TypeAlias = Callable[[str], bool] | PyTree | None
"""Which parameters a rule applies to: `None` (all, or none for `per_step`), a predicate on the
dotted parameter name (`lambda name: name.startswith("head.")`), or a pytree of Python bools with
the structure of the parameters."""

LossFn: TypeAlias = Callable[[Any, Any], torch.Tensor]
"""`loss_fn(params, data) -> scalar tensor`: the loss of one task, e.g.
`metabatch.nn.objective(model, torch.nn.functional.cross_entropy)`."""
