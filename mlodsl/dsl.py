"""``@ml.level``: turn a plain loss function into a level definition.

Decorating only records. The result is still callable as the plain function (so it can be
unit-tested), keeps its signature and docstring, remembers where it was defined, and registers
nothing global: re-running a notebook cell never duplicates a level.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import wrapt
from typing_extensions import ParamSpec

from mlodsl import errors
from mlodsl.hypergrad import HypergradMethod, resolve_method

P = ParamSpec("P")
R = TypeVar("R")

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class LevelSpec:
    """Everything ``@ml.level`` recorded about one level. Frozen: a level never changes."""

    name: str
    defined_at: str
    upper_of: tuple[str, ...]
    grad: HypergradMethod | None
    module: Any
    optimizer: Any
    scheduler: Any
    data: Any
    inner_steps: int
    init_from: str | None
    tasks: bool = False
    accumulate: int = 1
    clip_grad_norm: float | None = None
    precision: str = "fp32"
    warmup: int = 0
    log_every: int = 1


class Level(wrapt.CallableObjectProxy, Generic[P, R]):  # type: ignore[misc]
    """A level definition: the user's function plus its :class:`LevelSpec`.

    Calling it calls the plain function. ``spec`` holds the decorator's arguments.
    """

    def __init__(self, fn: Callable[P, R], spec: LevelSpec) -> None:
        super().__init__(fn)
        self._self_spec = spec

    @property
    def spec(self) -> LevelSpec:
        """The frozen record of this level's decorator arguments."""
        return self._self_spec

    @property
    def level_name(self) -> str:
        """The level's name (``name=`` or the function's name)."""
        return self._self_spec.name

    @property
    def defined_at(self) -> str:
        """``file:line`` where the level's function was defined."""
        return self._self_spec.defined_at

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.__wrapped__(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<mlodsl.Level '{self._self_spec.name}' defined at {self._self_spec.defined_at}>"

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError(
            f"level '{self._self_spec.name}' cannot be pickled; save a run with program.save()"
        )


def where_defined(fn: Callable[..., Any]) -> str:
    """``file:line`` of a function's definition, relative to the working directory if inside."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return "<unknown>"
    path = code.co_filename
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            path = rel
    except ValueError:  # another drive on Windows
        pass
    return f"{path}:{code.co_firstlineno}"


def level(
    fn: Callable[P, R] | None = None,
    *,
    name: str | None = None,
    upper_of: str | Iterable[str] | None = None,
    grad: str | HypergradMethod | None = None,
    module: torch.nn.Module | torch.Tensor | Iterable[torch.Tensor] | Mapping[str, torch.Tensor]
    | None = None,
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
    scheduler: Any = None,
    data: Any = None,
    inner_steps: int = 1,
    init_from: str | None = None,
    tasks: bool = False,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
    precision: str = "fp32",
    warmup: int = 0,
    log_every: int = 1,
) -> Any:
    """Declare a level of a multilevel program.

    The decorated function computes the level's loss. Its parameters are filled by name when
    the program runs: ``batch`` is this level's current batch, a parameter named after another
    level receives that level's handle (call it to run that level's module; attribute access
    reaches the module), and the reserved names give run context: ``step`` is the number of
    updates this level has taken so far (0 on its first call), ``epoch`` the completed passes
    over its data, ``global_step`` the current program step (from 1). A parameter with a
    default value that names none of these keeps its default, so a level function can also be
    run on its own (``def classifier(batch, hpo=fixed_decay)``). It returns a scalar loss tensor,
    or a dict with a ``"loss"`` key plus metrics.

    Args:
        fn: The loss function (when used as ``@ml.level`` without arguments).
        name: The level's name; defaults to the function's name.
        upper_of: Name or names of the level(s) this level sits directly above.
        grad: How this level's hypergradient through each level below it is computed: a name
            (``"cg"``, ``"neumann"``, ``"finite_diff"``/``"darts"``, ``"sama"``, ``"exact"``,
            ``"unroll"``) or a method object from ``ml.hypergrad``. Defaults to ``"cg"`` for
            levels with lowers.
        module: What this level trains: an ``nn.Module``, a tensor parameter, or a list/dict of
            parameters.
        optimizer: A ``torch.optim.Optimizer`` over the module's parameters, or a callable
            ``params -> Optimizer``.
        scheduler: An LR scheduler, or a callable ``optimizer -> scheduler``; stepped once per
            optimizer step.
        data: A DataLoader or any re-iterable (cycled forever, epochs counted), a callable that
            returns a batch, or ``None``.
        inner_steps: Steps each level below takes between two updates of this level.
        init_from: Upper level whose parameters this level restarts from at each of that
            level's steps: the upper level must be directly above this one and have parameters
            of the same shapes. With ``grad="unroll"`` on it this is MAML (differentiated
            through the restart); with an implicit method and a proximal term in this level's
            loss, iMAML (the parameters are copied, the optimizer state reset).
        tasks: The level's batch is a batch of tasks (a leading task dimension on every tensor):
            with ``init_from``, it adapts on all of them at once with ``torch.func.vmap``, and
            the upper level's loss is evaluated per task and averaged. Level functions are
            written for one task. Under an implicit method (iMAML) the tasks' steps are not
            differentiated and ``cg`` solves one system per task.
        accumulate: Micro-batches per optimizer step: each step of this level takes this many
            batches and averages their gradients (hypergradients for an upper level).
        clip_grad_norm: Clip this level's gradient to this total norm before each step.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast with dynamic loss
            scaling); parameters stay fp32.
        warmup: Program steps before this level's first update (its lowers train alone).
        log_every: Send this level's metrics to the program's logger every this many of
            its steps (the history keeps every step).

    Returns:
        A :class:`Level`, still callable as the plain function.

    Raises:
        AlreadyDecoratedError: ``fn`` already is a level.
        UnknownGradMethodError: ``grad`` names no method.
        InvalidLevelError: an argument has the wrong type or range.

    Example:
        >>> @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        ... def classifier(batch, hpo):
        ...     x, y = batch
        ...     return F.cross_entropy(net(x), y) + hpo.exp() * weight_norm(net)
    """
    arguments = dict(
        name=name, upper_of=upper_of, grad=grad, module=module, optimizer=optimizer,
        scheduler=scheduler, data=data, inner_steps=inner_steps, init_from=init_from, tasks=tasks,
        accumulate=accumulate, clip_grad_norm=clip_grad_norm, precision=precision,
        warmup=warmup, log_every=log_every,
    )

    def decorate(function: Callable[P, R]) -> Level[P, R]:
        return Level(function, _make_spec(function, **arguments))

    return decorate if fn is None else decorate(fn)


def _make_spec(fn: Callable[..., Any], **a: Any) -> LevelSpec:
    if isinstance(fn, Level):
        raise errors.AlreadyDecoratedError(
            f"level '{fn.level_name}' ({fn.defined_at}) is decorated with @ml.level twice; "
            "keep a single @ml.level(...) and merge the arguments into it."
        )
    if not callable(fn):
        raise errors.InvalidLevelError(
            f"@ml.level decorates a function, got {type(fn).__name__}"
        )
    where = where_defined(fn)
    name = a["name"] if a["name"] is not None else getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise errors.InvalidLevelError(
            f"level defined at {where} has name {name!r}; a level name must be a Python "
            "identifier, since other levels receive it as a parameter name."
        )

    def bad(message: str) -> errors.InvalidLevelError:
        return errors.InvalidLevelError(f"level '{name}' ({where}): {message}")

    upper_of = a["upper_of"]
    if upper_of is None:
        upper_of = ()
    elif isinstance(upper_of, str):
        upper_of = (upper_of,)
    elif isinstance(upper_of, Level):
        upper_of = (upper_of.level_name,)
    else:
        upper_of = tuple(u.level_name if isinstance(u, Level) else u for u in upper_of)
    if not all(isinstance(u, str) for u in upper_of):
        raise bad(f"upper_of must be a level name or names, got {a['upper_of']!r}")

    inner_steps = a["inner_steps"]
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise bad(f"inner_steps must be a positive integer, got {inner_steps!r}")

    if a["precision"] not in PRECISIONS:
        raise bad(f"precision must be one of {', '.join(PRECISIONS)}, got {a['precision']!r}")
    for option in ("accumulate", "warmup"):
        value, low = a[option], (1 if option == "accumulate" else 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(f"{option} must be an integer >= {low}, got {value!r}")
    log_every = a["log_every"]
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise bad(f"log_every must be a positive integer, got {log_every!r}")
    clip = a["clip_grad_norm"]
    if clip is not None and (not isinstance(clip, (int, float)) or clip <= 0):
        raise bad(f"clip_grad_norm must be a positive number or None, got {clip!r}")
    init_from = a["init_from"]
    if isinstance(init_from, Level):
        init_from = init_from.level_name
    if init_from is not None and not isinstance(init_from, str):
        raise bad(f"init_from must be a level name, got {init_from!r}")

    try:
        method = None if a["grad"] is None else resolve_method(a["grad"])
    except errors.UnknownGradMethodError as error:
        raise errors.UnknownGradMethodError(f"level '{name}' ({where}): {error}") from None

    return LevelSpec(
        name=name, defined_at=where, upper_of=upper_of, grad=method, module=a["module"],
        optimizer=a["optimizer"], scheduler=a["scheduler"], data=a["data"],
        inner_steps=inner_steps, init_from=init_from, tasks=bool(a["tasks"]),
        accumulate=a["accumulate"],
        clip_grad_norm=None if clip is None else float(clip), precision=a["precision"],
        warmup=a["warmup"], log_every=a["log_every"],
    )
