"""Unrolled lower levels: their steps taken functionally, so an upper level can differentiate
through them.

A level whose upper chose ``grad="unroll"`` trains on *fast weights*: tensors that carry the
autograd graph of its updates since the upper's previous step. Every level function runs with
those tensors swapped into the level's module through ``torch.func.functional_call`` on one
scope module that holds the unrolled levels' modules, so user code that calls its own module
(``net(x)``) sees them without being changed. Buffers (BatchNorm statistics) are not swapped:
they keep updating in place on the module and never enter the upper level's gradient.

Unrolling nests: a level that is unrolled may itself unroll its lowers. Its steps are then
gradients (with ``create_graph=True``) through its lowers' steps since its previous step, and
the lowers' trajectories run on, attached, until the top of the unrolled chain updates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from mlodsl import autodiff, batching
from mlodsl.errors import HypergradError
from mlodsl.flatten import flatten_state, task_leaves, unflatten_state
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
            # Prefixed: a level may be called 'train' or 'eval', names nn.Module already has.
            self.add_module(_scoped(name), module)

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
        # Each parameter's names in the scope, all of them where weights are tied: calls pass
        # tie_weights=False, which spares functional_call a walk over every module per call.
        in_scope: dict[int, list[str]] = {}
        for name, p in self.scope.named_parameters(remove_duplicate=False):
            in_scope.setdefault(id(p), []).append(name)
        self.keys = {lower: tuple(tuple(in_scope[id(p)]) for p in self.nodes[lower].params)
                     for lower in swapped}
        self.fast: dict[str, tuple[torch.Tensor, ...]] = {}
        self.end: dict[str, tuple[torch.Tensor, ...]] = {}
        self.state: dict[str, list[dict[str, Any]]] = {}
        self.taken: dict[str, int] = {}
        self.since: dict[str, int] = {}  # steps since the unrolling upper's last update
        self.grads: dict[str, tuple[torch.Tensor, ...]] = {}  # a nested level's latest step
        self.restart_due: set[str] = set()  # init_from levels to restart at their next step
        self.optimizers: dict[str, Any] = {}
        # Distributed runs average each step's gradients over the ranks (differentiably in the
        # window): (grads, differentiable) -> grads. The identity in one process.
        self.reduce: Callable[[list[torch.Tensor], bool], list[torch.Tensor]] = (
            lambda grads, differentiable: grads)

    def reset(self) -> None:
        """Forget every trajectory (after parameters were replaced, e.g. by a checkpoint): the
        next step of each unrolled level starts afresh from its current parameters."""
        for table in (self.fast, self.end, self.state, self.taken, self.since, self.restart_due):
            table.clear()

    def adapted_by(self, upper: str) -> tuple[str, ...]:
        """The levels that start afresh after each step of ``upper``: those it unrolls and its
        task-batch lowers."""
        return tuple(lower for lower in self.nodes[upper].lowers if lower in self.names)

    def unrolled_by(self, upper: str) -> tuple[str, ...]:
        """The levels ``upper`` unrolls."""
        return tuple(lower for lower, u in self.upper_of.items() if u == upper)

    def unrolled_under(self, upper: str) -> tuple[str, ...]:
        """The levels ``upper`` unrolls, and the levels those unroll, and so on (nested
        unrolling: ``top`` unrolls ``mid``, which unrolls ``low``)."""
        found: list[str] = []
        for lower in self.unrolled_by(upper):
            found += [lower, *self.unrolled_under(lower)]
        return tuple(found)

    def leaf_copies(self, lower: str) -> tuple[torch.Tensor, ...]:
        """Leaf tensors equal to the trajectory's end, swapped in while the upper's loss is
        computed (its partial derivatives w.r.t. them go back through the trajectory)."""
        if lower not in self.end:
            self._ensure_fast(lower)
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
                   for keys, tensor in zip(self.keys[level], tensors) for key in keys}
        return torch.func.functional_call(self.scope, mapping, (fn, kwargs), strict=False,
                                          tie_weights=False)

    def restart(self, lower: str) -> None:
        """Begin a new trajectory: from the upper's parameters (``init_from``: MAML) or from
        where the level is, cut from everything before."""
        node = self.nodes[lower]
        if node.init_from is not None:
            source = node.init_from
            if source in self.upper_of:  # nested: the source itself runs on fast weights
                self._ensure_fast(source)
                start = self.fast[source]
            else:
                start = tuple(self.nodes[source].params)
        else:
            start = tuple(p.detach().clone().requires_grad_() for p in node.params)
        self.fast[lower] = self.end[lower] = start
        self.state.pop(lower, None)  # fresh (init_from) or re-read from the real optimizer
        self.taken[lower] = self.since[lower] = 0
        self.restart_due.discard(lower)

    def _ensure_fast(self, level: str) -> None:
        """Give ``level`` fast weights if it has none yet; first those of the levels that
        unroll it (nested unrolling), so that its steps read theirs and stay on the graph."""
        upper = self.upper_of.get(level)
        if upper is not None and upper in self.upper_of:
            self._ensure_fast(upper)
        if level not in self.fast:
            self.restart(level)

    def upper_stepped(self, upper: str) -> None:
        """``upper``, itself unrolled, took a functional step (nested unrolling): the levels it
        unrolls begin a new window, but keep their graph, which the level above ``upper``
        differentiates through. An ``init_from`` level restarts from ``upper``'s new weights at
        its next step (until then, levels above read where its episode ended)."""
        for lower in self.unrolled_by(upper):
            if self.nodes[lower].init_from == upper:
                self.restart_due.add(lower)
            self.since[lower] = 0

    def cut(self, upper: str) -> None:
        """Detach the fast weights and optimizer states of every level ``upper`` unrolls
        (nested): what came before is a constant for the levels above, too."""
        for lower in self.unrolled_under(upper):
            if lower in self.fast:
                self.fast[lower] = self.end[lower] = tuple(
                    t.detach().requires_grad_() for t in self.end[lower])
            if lower in self.state:
                self.state[lower] = [{k: v.detach() if isinstance(v, torch.Tensor) else v
                                      for k, v in entry.items()} for entry in self.state[lower]]

    def step(self, lower: str, loss_of: Callable[[], torch.Tensor], position: int,
             count: int) -> torch.Tensor:
        """One functional update of ``lower``, the ``position``-th (from 0) of the ``count`` it
        takes between two updates of its upper level. Returns the step's loss."""
        node = self.nodes[lower]
        method = self._method(lower)
        self._ensure_fast(lower)
        if lower in self.restart_due:
            self.restart(lower)
        nested = bool(self.unrolled_by(lower))
        optimizer = self._optimizer(lower)
        if lower not in self.state:
            # init_from starts each episode afresh; otherwise continue the real optimizer's state
            source = self.fast[lower] if node.init_from is not None else node.params
            self.state[lower] = optimizer.init_state(source)
        window = method.steps is None or count - position <= method.steps
        differentiable = window and not method.first_order
        current = self.fast[lower]
        if not window and not nested:  # outside the truncation window: no graph back to these
            current = tuple(t.detach().requires_grad_() for t in current)
        elif self.upper_of[lower] in self.upper_of or node.init_from is not None:
            # These tensors may also reach this loss another way: nested, the unrolled level
            # above took steps that read them, so they are ancestors of its fast weights; with
            # init_from, a new episode starts on the upper's own tensors. A gradient w.r.t.
            # them would count those paths too; one w.r.t. a fresh alias counts only this
            # level's own use of its parameters.
            current = tuple(t.view_as(t) for t in current)
        keys, state = flatten_state(self.state[lower])
        out_keys: list[list[str]] = []  # the state's layout after the step (deterministic)
        n = len(current)

        def update(*inputs: torch.Tensor, graph: bool = True) -> tuple[torch.Tensor, ...]:
            # Pure in its inputs: with checkpoint=True it runs without a graph (graph=False),
            # then again with one during the backward pass.
            tensors, state_in = inputs[:n], unflatten_state(keys, inputs[n:])
            previous = self.fast[lower]
            self.fast[lower] = tensors
            keep = differentiable and graph
            try:
                loss = loss_of()
                # A nested level's gradient reaches back through the steps of the levels it
                # unrolls, whose graph the level above still needs: keep it.
                grads = autodiff.grad(loss, tensors, create_graph=keep,
                                      retain_graph=keep or nested, allow_unused=True)
            finally:
                self.fast[lower] = previous
            grads = [torch.zeros_like(t) if g is None else (g if keep else g.detach())
                     for g, t in zip(grads, tensors)]
            grads = self.reduce(grads, keep)
            if nested:
                self.grads[lower] = tuple(g.detach() for g in grads)
                if not window:  # the tensors stayed attached for the gradient; cut them now
                    tensors = tuple(t.detach().requires_grad_() for t in tensors)
            new, state_out = optimizer.step(list(tensors), grads, state_in)
            layout, flat_state = flatten_state(state_out)
            out_keys[:] = layout
            return (*new, *flat_state, loss)

        if method.checkpoint and differentiable:
            outputs = recomputed(update, (*current, *state), self._read_by_step(lower))
        else:
            outputs = update(*current, *state)
        new, loss = tuple(outputs[:n]), outputs[-1]
        self.state[lower] = unflatten_state(out_keys, outputs[n:-1])
        self.fast[lower] = self.end[lower] = new
        self.taken[lower] += 1
        self.since[lower] = self.since.get(lower, 0) + 1
        if nested and not window:
            self.cut(lower)
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
        keys, flat_state = flatten_state(self.state[lower])
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
            new, state = optimizer.step(list(tensors), list(grads), unflatten_state(keys, flat))
            out_keys[:], flat = flatten_state(state)
            return (*new, *flat, loss)

        dims = (None if shared else 0,) * (n + m) + (0,) * len(leaves)
        outputs = batching.flat_vmap(one_task, dims, (*current, *flat_state, *leaves))
        new, losses = outputs[:n], outputs[-1]
        self.state[lower] = unflatten_state(out_keys, outputs[n:-1])
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
        """After the upper level's update: hand the optimizer state back and start over.

        Without ``init_from`` the next trajectory begins at the level's next step, from its
        parameters and optimizer state as they are then: a hook may re-initialize them in
        between (one whole training run per upper step, as when learning a learning-rate
        schedule)."""
        node = self.nodes[lower]
        if node.init_from is not None:
            self.restart(lower)
        else:
            if lower in self.state:
                self.optimizers[lower].write_back(node.params, self.state[lower])
            for table in (self.fast, self.end, self.state):
                table.pop(lower, None)
            self.taken[lower] = self.since[lower] = 0
            self.restart_due.discard(lower)
        for below in self.unrolled_by(lower):  # nested: their trajectories end here too
            self.finish(below)

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


def _scoped(level: str) -> str:
    """A level's submodule name in the scope module."""
    return f"level_{level}"


def _param_names(node: LevelNode) -> tuple[str, ...]:
    by_id = {id(p): name for name, p in node.module.named_parameters()}
    return tuple(by_id[id(p)] for p in node.params)
