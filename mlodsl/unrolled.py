"""Unrolled lower levels: their steps taken functionally, so an upper level can differentiate
through them.

A level whose upper chose ``grad="unroll"`` trains on *fast weights*: tensors that carry the
autograd graph of its updates since the upper's previous step. Every level function runs with
those tensors swapped into the level's module through ``torch.func.functional_call`` on one
scope module that holds the unrolled levels' modules, so user code that calls its own module
(``net(x)``) sees them without being changed. Buffers (BatchNorm statistics) are not swapped:
they keep updating in place on the module and never enter the upper level's gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from mlodsl.errors import HypergradError
from mlodsl.ir import LevelNode
from mlodsl.recompute import recomputed

_NEEDS_MODULE = (
    "level '{lower}' ({where}) is unrolled by '{upper}' (grad='unroll' there, or tasks=True "
    "here), which swaps its parameters through torch.func.functional_call; that needs its "
    "module to be an nn.Module, but it trains a {kind}. Wrap the tensors in an nn.Module (or "
    "torch.nn.ParameterList), or use an implicit method such as grad='cg'."
)


class _Scope(torch.nn.Module):
    """The unrolled levels' modules under one root, so one functional_call swaps any of them."""

    def __init__(self, modules: Mapping[str, torch.nn.Module]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        return fn(**kwargs)


class Unroller:
    """Fast weights, functional optimizer states and trajectories of the unrolled levels."""

    def __init__(self, nodes: Mapping[str, LevelNode], methods: Mapping[str, Any]) -> None:
        self.nodes = nodes
        self.upper_of: dict[str, str] = {}  # unrolled lower -> the upper that unrolls it
        for upper, method in methods.items():
            if getattr(method, "unrolls", False):
                for lower in nodes[upper].lowers:
                    self.upper_of[lower] = upper
        for lower in (*self.upper_of, *(n for n, node in nodes.items() if node.tasks)):
            node, upper = self.nodes[lower], self.upper_of.get(lower, self.nodes[lower].init_from)
            if not isinstance(node.module, torch.nn.Module):
                raise HypergradError(_NEEDS_MODULE.format(
                    lower=lower, where=node.defined_at, upper=upper,
                    kind=type(node.module).__name__))
        # tasks=True levels below an implicit method (iMAML): their steps are vmapped over the
        # tasks like MAML's, but start from detached weights and are never differentiated.
        self.task_only = tuple(name for name, node in nodes.items()
                               if node.tasks and name not in self.upper_of)
        swapped = (*self.upper_of, *self.task_only)
        # Only these levels' modules: functional_call walks the whole scope on each call.
        self.scope = _Scope({lower: nodes[lower].module for lower in swapped})
        self.names = {lower: _param_names(self.nodes[lower]) for lower in swapped}
        self.keys = {lower: tuple(f"{lower}.{name}" for name in names)  # in the scope
                     for lower, names in self.names.items()}
        self.fast: dict[str, tuple[torch.Tensor, ...]] = {}
        self.end: dict[str, tuple[torch.Tensor, ...]] = {}
        self.state: dict[str, list[dict[str, Any]]] = {}
        self.taken: dict[str, int] = {}
        self.optimizers: dict[str, Any] = {}

    def reset(self) -> None:
        """Forget every trajectory (after parameters were replaced, e.g. by a checkpoint): the
        next step of each unrolled level starts afresh from its current parameters."""
        for table in (self.fast, self.end, self.state, self.taken):
            table.clear()

    def adapted_by(self, upper: str) -> tuple[str, ...]:
        """The levels that start afresh after each step of ``upper``: those it unrolls and its
        task-batch lowers."""
        return tuple(lower for lower in self.nodes[upper].lowers if lower in self.names)

    def unrolled_by(self, upper: str) -> tuple[str, ...]:
        """The levels ``upper`` unrolls."""
        return tuple(lower for lower, u in self.upper_of.items() if u == upper)

    def leaf_copies(self, lower: str) -> tuple[torch.Tensor, ...]:
        """Leaf tensors equal to the trajectory's end, swapped in while the upper's loss is
        computed (its partial derivatives w.r.t. them go back through the trajectory)."""
        if lower not in self.end:
            self.restart(lower)
        leaves = tuple(t.detach().requires_grad_() for t in self.end[lower])
        self.fast[lower] = leaves
        return leaves

    @property
    def active(self) -> bool:
        """Whether any level currently runs on fast weights."""
        return bool(self.fast)

    def call(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """Run a level function with the current fast weights swapped in."""
        if not self.fast:
            return fn(**kwargs)
        mapping = {key: tensor for level, tensors in self.fast.items()
                   for key, tensor in zip(self.keys[level], tensors)}
        return torch.func.functional_call(self.scope, mapping, (fn, kwargs), strict=False)

    def restart(self, lower: str) -> None:
        """Begin a new trajectory: from the upper's parameters (``init_from``: MAML) or from
        where the level is, cut from everything before."""
        node = self.nodes[lower]
        if node.init_from is not None:
            start = tuple(self.nodes[node.init_from].params)
        else:
            start = tuple(p.detach().clone().requires_grad_() for p in node.params)
        self.fast[lower] = self.end[lower] = start
        self.state.pop(lower, None)  # fresh (init_from) or re-read from the real optimizer
        self.taken[lower] = 0

    def step(self, lower: str, loss_of: Callable[[], torch.Tensor], position: int,
             count: int) -> torch.Tensor:
        """One functional update of ``lower``, the ``position``-th (from 0) of the ``count`` it
        takes between two updates of its upper level. Returns the step's loss."""
        node = self.nodes[lower]
        method = self._method(lower)
        if lower not in self.fast:
            self.restart(lower)
        optimizer = self._optimizer(lower)
        if lower not in self.state:
            # init_from starts each episode afresh; otherwise continue the real optimizer's state
            source = self.fast[lower] if node.init_from is not None else node.params
            self.state[lower] = optimizer.init_state(source)
        window = method.steps is None or count - position <= method.steps
        differentiable = window and not method.first_order
        current = self.fast[lower]
        if not window:  # outside the truncation window: no graph back to these steps
            current = tuple(t.detach().requires_grad_() for t in current)
        keys, state = _flatten_state(self.state[lower])
        out_keys: list[list[str]] = []  # the state's layout after the step (deterministic)
        n = len(current)

        def update(*inputs: torch.Tensor, graph: bool = True) -> tuple[torch.Tensor, ...]:
            # Pure in its inputs: with checkpoint=True it runs without a graph (graph=False),
            # then again with one during the backward pass.
            tensors, state_in = inputs[:n], _unflatten_state(keys, inputs[n:])
            previous = self.fast[lower]
            self.fast[lower] = tensors
            keep = differentiable and graph
            try:
                loss = loss_of()
                grads = torch.autograd.grad(loss, tensors, create_graph=keep, allow_unused=True)
            finally:
                self.fast[lower] = previous
            grads = [torch.zeros_like(t) if g is None else (g if keep else g.detach())
                     for g, t in zip(grads, tensors)]
            new, state_out = optimizer.step(list(tensors), grads, state_in)
            layout, flat_state = _flatten_state(state_out)
            out_keys[:] = layout
            return (*new, *flat_state, loss)

        if method.checkpoint and differentiable:
            outputs = recomputed(update, (*current, *state), self._read_by_step(lower))
        else:
            outputs = update(*current, *state)
        new, loss = tuple(outputs[:n]), outputs[-1]
        self.state[lower] = _unflatten_state(out_keys, outputs[n:-1])
        self.fast[lower] = self.end[lower] = new
        self.taken[lower] += 1
        with torch.no_grad():  # the module's own tensors mirror the fast weights
            for p, t in zip(node.params, new):
                p.copy_(t)
        return loss

    def step_tasks(self, lower: str, loss_for: Callable[[Any], torch.Tensor], batch: Any,
                   position: int, count: int) -> torch.Tensor:
        """One functional update of a ``tasks=True`` level on every task of ``batch`` at once
        (``torch.func.vmap``): per-task fast weights, per-task optimizer state. Returns the
        per-task losses."""
        node = self.nodes[lower]
        implicit = lower in self.task_only
        leaves, rebuild = task_leaves(batch, lower, node.defined_at)
        # A new episode: every task starts from the meta weights, passed to vmap unbatched
        # (in_dims=None) so that the first step runs the shared weights as plain matrix
        # products rather than one batched product per task.
        shared = self.taken.get(lower, 0) == 0
        if shared:
            meta = self.nodes[node.init_from].params
            self.fast[lower] = tuple(p.detach() for p in meta) if implicit else tuple(meta)
        optimizer = self._optimizer(lower)
        if lower not in self.state:
            self.state[lower] = optimizer.init_state(self.fast[lower])
        if implicit:  # the upper's implicit method needs only where the steps end
            window, differentiable = True, False
        else:
            method = self._method(lower)
            window = method.steps is None or count - position <= method.steps
            differentiable = window and not method.first_order
        current = self.fast[lower]
        if not window:
            current = tuple(t.detach().requires_grad_() for t in current)

        # vmap gets and returns flat tuples of tensors: its pytree handling of nested inputs
        # and outputs (a plain SGD state is one empty dict per parameter) costs as much as the
        # step's arithmetic on a small model.
        keys, flat_state = _flatten_state(self.state[lower])
        out_keys: list[list[str]] = []
        n, m = len(current), len(flat_state)

        def one_task(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            tensors, flat = inputs[:n], inputs[n:n + m]
            task = rebuild(inputs[n + m:])

            def loss_of(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
                previous = self.fast[lower]
                self.fast[lower] = weights
                try:
                    return loss_for(task)
                finally:
                    self.fast[lower] = previous

            grads, loss = torch.func.grad_and_value(loss_of)(tensors)
            if not differentiable:
                grads = tuple(g.detach() for g in grads)
            new, state = optimizer.step(list(tensors), list(grads), _unflatten_state(keys, flat))
            out_keys[:], flat = _flatten_state(state)
            return (*new, *flat, loss)

        dims = (None if shared else 0,) * (n + m) + (0,) * len(leaves)
        outputs = torch.func.vmap(one_task, in_dims=dims)(*current, *flat_state, *leaves)
        new, losses = outputs[:n], outputs[-1]
        self.state[lower] = _unflatten_state(out_keys, outputs[n:-1])
        self.fast[lower] = self.end[lower] = new
        # The module keeps its own tensors: each task has its weights, none is "the" learner.
        self.taken[lower] = self.taken.get(lower, 0) + 1
        return losses

    def tasks_lower(self, upper: str) -> str | None:
        """The ``tasks=True`` level directly below ``upper``, if any."""
        return next((lower for lower in self.nodes[upper].lowers if self.nodes[lower].tasks),
                    None)

    def task_leaves(self, lower: str) -> tuple[torch.Tensor, ...]:
        """Leaf tensors equal to the adapted per-task weights of a ``tasks=True`` level under
        an implicit method, swapped in while its upper's hypergradient is computed."""
        if self.taken.get(lower, 0) == 0:
            raise HypergradError(
                f"level '{lower}' ({self.nodes[lower].defined_at}) has tasks=True but has not "
                "adapted on a task batch since its upper level's last step, so there are no "
                "per-task weights to differentiate at; run the program before asking for the "
                "hypergradient.")
        leaves = tuple(t.detach().requires_grad_() for t in self.end[lower])
        self.fast[lower] = leaves
        return leaves

    def finish(self, lower: str) -> None:
        """After the upper level's update: hand the optimizer state back and start over."""
        node = self.nodes[lower]
        if node.init_from is None and lower in self.state:
            self.optimizers[lower].write_back(node.params, self.state[lower])
        self.restart(lower)

    def _read_by_step(self, lower: str) -> list[Any]:
        """What a step of ``lower`` may read besides its weights and state: every other level's
        current tensors and its optimizer's tensor hyperparameters (a learnable step size)."""
        tensors = [t for name, node in self.nodes.items() if name != lower
                   for t in self.fast.get(name, node.params)]
        for group in self.nodes[lower].optimizer.param_groups:
            for value in group.values():
                tensors.extend(v for v in (value if isinstance(value, tuple) else (value,))
                               if isinstance(v, torch.Tensor))
        return tensors

    def _optimizer(self, lower: str) -> Any:
        if lower not in self.optimizers:
            from mlodsl.functional import functional_optimizer  # only programs that unroll

            node = self.nodes[lower]
            self.optimizers[lower] = functional_optimizer(node.optimizer, node.params)
        return self.optimizers[lower]

    def _method(self, lower: str) -> Any:
        return self.nodes[self.upper_of[lower]].method


def task_leaves(batch: Any, level: str, where: str
                ) -> tuple[list[Any], Callable[[tuple[Any, ...]], Any]]:
    """A task batch's tensors, checked to share one leading task dimension, and the function
    that rebuilds a batch of that structure from them (what vmap hands each task)."""
    if type(batch) in (tuple, list) and all(type(t) is torch.Tensor for t in batch):
        leaves, rebuild = list(batch), type(batch)  # the common case, without pytree's cost
    else:
        leaves, spec = torch.utils._pytree.tree_flatten(batch)
        rebuild = lambda flat: torch.utils._pytree.tree_unflatten(list(flat), spec)  # noqa: E731
    if not leaves or any(not isinstance(t, torch.Tensor) or t.ndim == 0
                         or t.shape[0] != leaves[0].shape[0] for t in leaves):
        raise HypergradError(
            f"level '{level}' ({where}) has tasks=True, so its batch must hold only tensors "
            "with the same leading task dimension; got "
            f"{[tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in leaves]}.")
    return leaves, rebuild


def _flatten_state(state: list[dict[str, Any]]) -> tuple[list[list[str]], list[torch.Tensor]]:
    keys = [sorted(k for k, v in entry.items() if isinstance(v, torch.Tensor)) for entry in state]
    return keys, [entry[k] for entry, names in zip(state, keys) for k in names]


def _unflatten_state(keys: list[list[str]], tensors: Any) -> list[dict[str, torch.Tensor]]:
    it = iter(tensors)
    return [{k: next(it) for k in names} for names in keys]


def _param_names(node: LevelNode) -> tuple[str, ...]:
    by_id = {id(p): name for name, p in node.module.named_parameters()}
    return tuple(by_id[id(p)] for p in node.params)
