"""Level handles: what a level function receives for a parameter named after another level.

Calling a handle runs that level's module; attribute access, indexing and arithmetic reach the
module itself, so ``hpo.exp()`` works when the level trains a single tensor. ``handle.module``
is always the underlying module, tensor or container.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from mlodsl.errors import LevelRuntimeError


class LevelHandle:
    """Stands for a level inside another level's function."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str, module: Any) -> None:
        self._name = name
        self._module = module

    @property
    def module(self) -> Any:
        """The level's module (an ``nn.Module``, a tensor, or a tuple/dict of tensors)."""
        return self._module

    @property
    def name(self) -> str:
        """The level's name."""
        return self._name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self._module, torch.nn.Module):
            return self._module(*args, **kwargs)
        raise LevelRuntimeError(
            f"level '{self._name}' trains a {type(self._module).__name__}, which cannot be "
            f"called; use it directly (e.g. {self._name}.exp(), {self._name} * x, "
            f"{self._name}[0])."
        )

    def __getattr__(self, attribute: str) -> Any:
        if attribute in LevelHandle.__slots__:  # not yet set (copy, unpickling)
            raise AttributeError(attribute)
        return getattr(self._module, attribute)

    def __getitem__(self, key: Any) -> Any:
        return self._module[key]

    def __len__(self) -> int:
        return len(self._module)

    def __iter__(self) -> Any:
        return iter(self._module)

    def __repr__(self) -> str:
        return f"<level handle '{self._name}': {type(self._module).__name__}>"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        # torch.exp(handle), F.linear(x, handle), ...: run on the tensor the handle stands for.
        return func(*_unwrap(args), **_unwrap(kwargs or {}))


def _unwrap(value: Any) -> Any:
    if isinstance(value, LevelHandle):
        return value.module
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _forward(op: Any) -> Any:
    def method(self: LevelHandle, *args: Any) -> Any:
        return op(self._module, *_unwrap(args))
    return method


def _reflected(op: Any) -> Any:
    def method(self: LevelHandle, other: Any) -> Any:
        return op(_unwrap(other), self._module)
    return method


_BINARY = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
           "truediv": operator.truediv, "floordiv": operator.floordiv, "mod": operator.mod,
           "pow": operator.pow, "matmul": operator.matmul}
for _name, _op in _BINARY.items():
    setattr(LevelHandle, f"__{_name}__", _forward(_op))
    setattr(LevelHandle, f"__r{_name}__", _reflected(_op))
for _name, _op in {"neg": operator.neg, "pos": operator.pos, "abs": operator.abs,
                   "lt": operator.lt, "le": operator.le, "gt": operator.gt,
                   "ge": operator.ge}.items():
    setattr(LevelHandle, f"__{_name}__", _forward(_op))
