"""Trace decorated levels into a validated :class:`~mlodsl.ir.Graph`.

One check per function; :func:`trace` runs them in an order where each may rely on the ones
before it (names are unique before edges are resolved, edges before cycles, ...).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

from mlodsl import errors
from mlodsl.dsl import Level, LevelSpec, where_defined
from mlodsl.hypergrad import DEFAULT, resolve_method
from mlodsl.ir import BATCH, RESERVED, Argument, Edge, Graph, LevelNode, Read
from mlodsl.log import loggers
from mlodsl.validation import EarlyStopping, check_validation

_UNKNOWN_UPPER_OF = (
    "level '{name}' ({where}) is upper_of '{target}', but no level with that name was traced."
    "{hint} Traced levels: {names}. Pass every level to ml.program(...)."
)
_UNKNOWN_PARAMETER = (
    "level '{name}' ({where}) has a parameter '{param}' that mlodsl cannot fill.{hint} A level "
    "function's parameters must be 'batch', the name of a traced level ({names}), or a reserved "
    "name ({reserved}); give '{param}' a default value if it is your own argument."
)
_NO_OPTIMIZER = (
    "level '{name}' ({where}) has no optimizer. Pass optimizer=torch.optim.SGD(...) (or a "
    "callable params -> optimizer) to @ml.level."
)
_NO_MODULE = (
    "level '{name}' ({where}) has no module: nothing for it to train. Pass module=<nn.Module, "
    "Parameter, or list/dict of parameters> to @ml.level."
)
_SHARED = (
    "levels '{a}' ({where_a}) and '{b}' ({where_b}) both train a parameter of shape {shape}; each "
    "tensor must belong to one level. Give each level its own parameters (a level reads "
    "another's through its handle)."
)
_ITERATOR_DATA = (
    "level '{name}' ({where}) has data of type {kind}, an iterator that can be read only once; "
    "mlodsl cycles through data forever. Pass a re-iterable (a DataLoader, a list of batches) "
    "or a callable that returns a batch."
)
_TENSOR_DATA = (
    "level '{name}' ({where}) has data that is a {kind}, which would be iterated "
    "element by element. To use the same batch every step pass data=lambda: batch; to iterate "
    "over batches pass a DataLoader or a list of batches."
)

PENDING_OPTIONS = ("distributed",)
OPTIONS = ("device", "seed", "hooks", "progress", "logger", "validation", "validate_every",
           "early_stopping", "checkpoint_dir", "checkpoint_every", "keep_checkpoints",
           "on_nonfinite", *PENDING_OPTIONS)


def trace(levels: Sequence[Any], options: Mapping[str, Any]) -> Graph:
    """Resolve, validate and freeze ``levels`` into a :class:`Graph`."""
    specs = [_check_is_level(level, i) for i, level in enumerate(levels)]
    _check_options(options)
    loggers(options.get("logger"))  # a bad or uninstalled logger fails here
    _check_unique_names(specs)
    by_name = {spec.name: spec for spec in specs}
    functions = {spec.name: level for spec, level in zip(specs, levels)}
    _check_run_options(options, by_name)
    _check_upper_of(specs, by_name)
    lowers = {spec.name: spec.upper_of for spec in specs}
    uppers = {spec.name: tuple(s.name for s in specs if spec.name in s.upper_of)
              for spec in specs}
    order = _bottom_up_order(specs, lowers, by_name)
    modules = {spec.name: _module_and_params(spec) for spec in specs}
    _check_shared_parameters(specs, modules)
    owners = {id(p): spec for spec in specs for p in modules[spec.name][1]}
    optimizers = {spec.name: _optimizer(spec, modules[spec.name][1], owners) for spec in specs}
    for spec in specs:
        _check_data(spec)

    nodes = []
    for name in order:
        spec = by_name[name]
        module, params = modules[name]
        method = None
        if lowers[name]:
            method = spec.grad if spec.grad is not None else resolve_method(DEFAULT)
        nodes.append(LevelNode(
            name=name, defined_at=spec.defined_at, fn=functions[name].__wrapped__,
            module=module, params=params, optimizer=optimizers[name],
            scheduler=_scheduler(spec, optimizers[name]), data=spec.data,
            inner_steps=spec.inner_steps, method=method, uppers=uppers[name],
            lowers=lowers[name], arguments=_arguments(functions[name], spec, by_name),
            log_every=spec.log_every,
            clip_grad_norm=spec.clip_grad_norm, accumulate=spec.accumulate,
            precision=spec.precision, warmup=spec.warmup, init_from=spec.init_from,
            tasks=spec.tasks,
        ))
    _check_unrolling(nodes)
    edges = tuple(Edge(upper=n.name, lower=lower, method=n.method.name)
                  for n in reversed(nodes) for lower in n.lowers if n.method is not None)
    reads = tuple(Read(reader=n.name, level=target) for n in nodes for target in n.reads)
    return Graph(levels=tuple(nodes), edges=edges, reads=reads,
                 options=MappingProxyType(dict(options)))


def _check_unrolling(nodes: Sequence[LevelNode]) -> None:
    """grad='unroll' and init_from: what the unrolled interpreter can honour."""
    by_name = {n.name: n for n in nodes}
    unrolled_by: dict[str, str] = {}
    for node in nodes:
        if not getattr(node.method, "unrolls", False):
            continue
        if node.uppers:
            raise errors.InvalidLevelError(
                f"level '{node.name}' ({node.defined_at}) unrolls the levels below it "
                f"(grad='unroll') and is itself below {', '.join(node.uppers)}; this version "
                "differentiates unrolled steps only for a level with nothing above it. Use an "
                "implicit method (grad='cg') on one of the two edges.")
        for lower in node.lowers:
            low = by_name[lower]
            if low.lowers:
                raise errors.InvalidLevelError(
                    f"level '{node.name}' ({node.defined_at}) unrolls '{lower}' "
                    f"(grad='unroll'), but '{lower}' has levels below it; unrolling reaches only "
                    "lowest levels. Use an implicit method (grad='cg') on this edge.")
            if lower in unrolled_by:
                raise errors.InvalidLevelError(
                    f"level '{lower}' ({low.defined_at}) is unrolled by both "
                    f"'{unrolled_by[lower]}' and '{node.name}'; one upper level may unroll it.")
            unrolled_by[lower] = node.name
    for node in nodes:
        if node.tasks and (node.init_from is None or node.accumulate != 1):
            raise errors.InvalidLevelError(
                f"level '{node.name}' ({node.defined_at}) has tasks=True, which adapts a batch of "
                "tasks in parallel from an upper level's parameters: it needs init_from=<the "
                "upper level> (with grad='unroll' there) and accumulate=1.")
        source = node.init_from
        if source is None:
            continue
        where = f"level '{node.name}' ({node.defined_at}) has init_from='{source}'"
        if source not in by_name:
            raise errors.UnknownLevelError(
                f"{where}, but no level with that name was traced."
                f"{errors.did_you_mean(source, by_name)} Traced levels: "
                f"{errors.listing(by_name)}.")
        if source not in node.uppers:
            raise errors.InvalidLevelError(
                f"{where}, so '{source}' must be directly above it: give '{source}' "
                f"upper_of='{node.name}' (with grad='unroll' for MAML, or an implicit method "
                "such as grad='cg' with a proximal term in the loss for iMAML).")
        if node.tasks and (node.lowers or by_name[source].method.name == "sama"):
            raise errors.InvalidLevelError(f"{where} and tasks=True: it must be a lowest level, "
                                           f"and '{source}' needs grad='unroll' or an implicit "
                                           "method other than 'sama'.")
        shapes = [tuple(p.shape) for p in node.params]
        theirs = [tuple(p.shape) for p in by_name[source].params]
        if shapes != theirs:
            raise errors.InvalidLevelError(
                f"{where}, but their parameters differ: {shapes} vs {theirs}. Build both "
                "modules with the same architecture.")


def _check_is_level(level: Any, index: int) -> LevelSpec:
    if not isinstance(level, Level):
        what = f"{type(level).__name__} {level!r:.60}"
        if callable(level) and hasattr(level, "__code__"):
            what = f"the plain function '{level.__name__}' ({where_defined(level)})"
        raise errors.InvalidLevelError(
            f"ml.program argument {index + 1} is {what}, not a level; decorate the function "
            "with @ml.level(...) and pass the decorated function."
        )
    return level.spec


def _check_options(options: Mapping[str, Any]) -> None:
    for key, value in options.items():
        if key not in OPTIONS:
            raise TypeError(
                f"ml.program got an unknown option '{key}'.{errors.did_you_mean(key, OPTIONS)} "
                f"Options: {errors.listing(OPTIONS)}."
            )
        if key in PENDING_OPTIONS and value is not None:
            raise NotImplementedError(
                f"ml.program option {key}={value!r} is not implemented in this version of "
                "mlodsl; remove it until it lands."
            )


def _check_run_options(options: Mapping[str, Any], by_name: Mapping[str, LevelSpec]) -> None:
    if options.get("validation") is not None:
        check_validation(options["validation"], options.get("validate_every"), list(by_name))
    elif options.get("validate_every") is not None or options.get("early_stopping") is not None:
        raise errors.TraceError("validate_every and early_stopping need a validation callback: "
                                "pass validation=<function returning a dict of metrics>")
    stopping = options.get("early_stopping")
    if stopping is not None and not isinstance(stopping, EarlyStopping):
        raise errors.TraceError(f"early_stopping must be an ml.EarlyStopping(...), got "
                                f"{type(stopping).__name__}")
    every = options.get("checkpoint_every")
    if (every is None) != (options.get("checkpoint_dir") is None):
        raise errors.TraceError("periodic checkpoints need both checkpoint_dir and "
                                "checkpoint_every (program steps)")
    for key in ("checkpoint_every", "keep_checkpoints"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise errors.TraceError(f"{key} must be a positive integer, got {value!r}")
    if options.get("on_nonfinite", "raise") not in ("raise", "skip"):
        raise errors.TraceError(f"on_nonfinite must be 'raise' or 'skip', got "
                                f"{options['on_nonfinite']!r}")


def _check_unique_names(specs: Sequence[LevelSpec]) -> None:
    seen: dict[str, LevelSpec] = {}
    for spec in specs:
        if spec.name in seen:
            first = seen[spec.name]
            raise errors.DuplicateLevelError(
                f"two levels are named '{spec.name}': one defined at {first.defined_at}, one at "
                f"{spec.defined_at}. Rename one with @ml.level(name=...). (Passing the same "
                "level twice to ml.program also does this.)"
            )
        seen[spec.name] = spec


def _check_upper_of(specs: Sequence[LevelSpec], by_name: Mapping[str, LevelSpec]) -> None:
    for spec in specs:
        for target in spec.upper_of:
            if target not in by_name:
                raise errors.UnknownLevelError(_UNKNOWN_UPPER_OF.format(
                    name=spec.name, where=spec.defined_at, target=target,
                    hint=errors.did_you_mean(target, by_name), names=errors.listing(by_name)))


def _bottom_up_order(specs: Sequence[LevelSpec], lowers: Mapping[str, tuple[str, ...]],
                     by_name: Mapping[str, LevelSpec]) -> list[str]:
    """Depth-first topological sort (lowers first); a back edge is a cycle, reported as a path."""
    order: list[str] = []
    state: dict[str, str] = {}  # "open" while on the stack, "done" after

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = path[path.index(name):] + [name]
            where = ", ".join(f"{n} ({by_name[n].defined_at})" for n in cycle[:-1])
            raise errors.CycleError(
                f"the upper_of relation has a cycle: {' -> '.join(cycle)} (each upper_of the "
                f"next). Levels involved: {where}. Remove one of these upper_of entries."
            )
        state[name] = "open"
        for lower in lowers[name]:
            visit(lower, path + [name])
        state[name] = "done"
        order.append(name)

    for spec in specs:
        visit(spec.name, [])
    return order


def _module_and_params(spec: LevelSpec) -> tuple[Any, tuple[torch.Tensor, ...]]:
    module = spec.module
    if module is None:
        raise errors.MissingModuleError(_NO_MODULE.format(name=spec.name, where=spec.defined_at))
    if isinstance(module, torch.nn.Module):
        params = tuple(p for p in module.parameters() if p.requires_grad)
    elif isinstance(module, torch.Tensor):
        params = (module,)
    elif isinstance(module, Mapping):
        module = MappingProxyType(dict(module))
        params = tuple(module.values())
    elif isinstance(module, (list, tuple)):
        module = tuple(module)
        params = module
    else:
        raise errors.InvalidLevelError(
            f"level '{spec.name}' ({spec.defined_at}) has module of type "
            f"{type(module).__name__}; pass an nn.Module, a Parameter, or a list/dict of them."
        )
    bad = [p for p in params if not isinstance(p, torch.Tensor) or not p.requires_grad
           or not p.is_leaf]
    if bad or not params:
        raise errors.InvalidLevelError(
            f"level '{spec.name}' ({spec.defined_at}) has no trainable parameters"
            + ("" if not bad else f" ({len(bad)} of its tensors are not leaf tensors with "
               "requires_grad=True)")
            + ". Use torch.nn.Parameter(...) or tensor.requires_grad_()."
        )
    return module, params


def _check_shared_parameters(specs: Sequence[LevelSpec],
                             modules: Mapping[str, tuple[Any, tuple[torch.Tensor, ...]]]) -> None:
    owner: dict[int, LevelSpec] = {}
    for spec in specs:
        for p in modules[spec.name][1]:
            first = owner.setdefault(id(p), spec)
            if first is not spec:
                raise errors.SharedParameterError(_SHARED.format(
                    a=first.name, where_a=first.defined_at, b=spec.name,
                    where_b=spec.defined_at, shape=tuple(p.shape)))


def _optimizer(spec: LevelSpec, params: tuple[torch.Tensor, ...],
               owners: Mapping[int, LevelSpec]) -> torch.optim.Optimizer:
    optimizer = spec.optimizer
    if optimizer is None:
        raise errors.MissingOptimizerError(
            _NO_OPTIMIZER.format(name=spec.name, where=spec.defined_at))
    if not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise errors.InvalidLevelError(
                f"level '{spec.name}' ({spec.defined_at}) has optimizer of type "
                f"{type(optimizer).__name__}; pass a torch.optim.Optimizer or a callable "
                "params -> Optimizer."
            )
        optimizer = optimizer(list(params))
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise errors.InvalidLevelError(
                f"level '{spec.name}' ({spec.defined_at}): the optimizer factory returned "
                f"{type(optimizer).__name__}, not a torch.optim.Optimizer."
            )
    own = {id(p) for p in params}
    foreign = [p for group in optimizer.param_groups for p in group["params"]
               if id(p) not in own]
    if foreign:
        owner = owners.get(id(foreign[0]))
        whose = (f"trained by level '{owner.name}' ({owner.defined_at})" if owner is not None
                 else "trained by no level")
        raise errors.SharedParameterError(
            f"level '{spec.name}' ({spec.defined_at}): its optimizer updates {len(foreign)} "
            f"tensor(s) that are not in its module; the first, of shape "
            f"{tuple(foreign[0].shape)}, is {whose}. Build the optimizer over this level's own "
            "parameters only."
        )
    return optimizer


def _scheduler(spec: LevelSpec, optimizer: torch.optim.Optimizer) -> Any:
    scheduler = spec.scheduler
    if scheduler is None or hasattr(scheduler, "step"):
        return scheduler
    if callable(scheduler):
        return scheduler(optimizer)
    raise errors.InvalidLevelError(
        f"level '{spec.name}' ({spec.defined_at}) has scheduler of type "
        f"{type(scheduler).__name__}; pass an LR scheduler or a callable optimizer -> scheduler."
    )


def _check_data(spec: LevelSpec) -> None:
    data = spec.data
    if data is None:
        return
    # A tuple of tensors reads as one (x, y) batch, but iterating it would yield x, then y.
    # (A list of tensors is taken as a list of batches.)
    if isinstance(data, torch.Tensor) or (
            isinstance(data, tuple) and data and all(isinstance(x, torch.Tensor) for x in data)):
        kind = "tensor" if isinstance(data, torch.Tensor) else "tuple of tensors"
        raise errors.InvalidLevelError(_TENSOR_DATA.format(
            name=spec.name, where=spec.defined_at, kind=kind))
    if isinstance(data, Iterator):
        raise errors.InvalidLevelError(_ITERATOR_DATA.format(
            name=spec.name, where=spec.defined_at, kind=type(data).__name__))
    if not (hasattr(type(data), "__iter__") or callable(data)):
        raise errors.InvalidLevelError(
            f"level '{spec.name}' ({spec.defined_at}) has data of type {type(data).__name__}; "
            "pass a DataLoader, a re-iterable, a callable returning a batch, or None."
        )


def _arguments(level: Level, spec: LevelSpec, by_name: Mapping[str, LevelSpec]
               ) -> tuple[Argument, ...]:
    arguments = []
    for param in inspect.signature(level.__wrapped__).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name == BATCH:
            kind, target = "batch", BATCH
        elif param.name in by_name:
            kind, target = "level", param.name
        elif param.name in RESERVED:
            kind, target = "reserved", param.name
        elif param.default is not param.empty:
            continue
        else:
            raise errors.UnknownParameterError(_UNKNOWN_PARAMETER.format(
                name=spec.name, where=spec.defined_at, param=param.name,
                hint=errors.did_you_mean(param.name, [*by_name, BATCH, *RESERVED]),
                names=errors.listing(by_name), reserved=", ".join(RESERVED)))
        if param.kind == param.POSITIONAL_ONLY:
            raise errors.UnknownParameterError(
                f"level '{spec.name}' ({spec.defined_at}): parameter '{param.name}' is "
                "positional-only; mlodsl passes arguments by name, so remove the '/' marker."
            )
        arguments.append(Argument(name=param.name, kind=kind, target=target))
    return tuple(arguments)
