"""How the interpreter runs ``init_from`` levels under an implicit method (iMAML).

Mixed into :class:`mlodsl.run.Interpreter`. One task: the level restarts from its upper's
parameters by a copy after each upper step. A ``tasks=True`` level adapts on every task of its
batch at once (``torch.func.vmap`` over per-task weights, as for MAML, but never
differentiated). For its upper level's hypergradient the adapted per-task weights become leaf
tensors stacked on a leading task dimension: the upper loss is each task's loss with its own
weights, averaged, and the lower loss is the *sum* of the tasks' losses, so its Hessian is
block-diagonal with each task's own Hessian as a block and the implicit function theorem
applies task by task: ``sum_i -(d2 L_i / d theta d phi_i) H_i^{-1} dF/dphi_i``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mlodsl import batching
from mlodsl.flatten import task_leaves
from mlodsl.hypergrad import blocks
from mlodsl.ir import LevelNode


class TaskSteps:
    """Interpreter methods for ``init_from`` levels below implicit methods (a mixin)."""

    unroller: Any
    nodes: dict[str, LevelNode]
    restarted_by: dict[str, tuple[str, ...]]

    def _restart_lowers(self, upper: str) -> None:
        """After a step of ``upper`` (or one skipped as non-finite): the levels it unrolls or
        adapts on task batches start new trajectories, its other init_from levels restart."""
        if self.unroller is not None:
            for lower in self.unroller.adapted_by(upper):
                self.unroller.finish(lower)
        for lower in self.restarted_by[upper]:
            self._restart_from(lower, upper)

    def _restart_from(self, lower: str, upper: str) -> None:
        """``init_from`` without unrolling (iMAML): ``lower`` starts over from ``upper``'s
        current parameters, with a fresh optimizer state."""
        node = self.nodes[lower]
        with torch.no_grad():
            for p, source in zip(node.params, self.nodes[upper].params):
                p.copy_(source)
        node.optimizer.state.clear()

    def _task_update(self, name: str, micro: tuple[Any, ...]) -> dict[str, Any]:
        """One step of every task of the batch, side by side (no graph kept)."""
        node = self.nodes[name]

        def loss_for(task: Any) -> torch.Tensor:
            return self._evaluate(node, task, per_task=True)[0]

        with torch.no_grad():  # vmap's grad transform still differentiates inside
            loss = self.unroller.step_tasks(name, loss_for, micro[0], 0, 1).mean()
        record = {"loss": loss}
        if not self._finite(loss, name, "loss"):
            return self._skip(record)
        self.committed = True
        return record

    def _task_loss(self, node: LevelNode, batch: Any, context: str) -> torch.Tensor:
        """The sum over the tasks of ``node``'s loss, each with its own current weights."""
        name = node.name
        stacked = self.unroller.fast[name]
        leaves, rebuild = task_leaves(batch, name, node.defined_at)
        n = len(stacked)

        def one_task(*inputs: torch.Tensor) -> tuple[torch.Tensor]:
            self.unroller.fast[name] = inputs[:n]
            return (self._evaluate(node, rebuild(inputs[n:]), context, per_task=True)[0],)

        try:
            (losses,) = batching.flat_vmap(one_task, (0,) * (n + len(leaves)),
                                           (*stacked, *leaves))
            return losses.sum()
        finally:
            self.unroller.fast[name] = stacked

    def _upper_weights(self, name: str, override: bool = False
                       ) -> contextlib.AbstractContextManager[None]:
        """While ``name``'s hypergradient is computed: its unrolled lowers on leaf copies where
        needed (:meth:`_leaf_fast_weights`), and its task-batch lowers on leaf tensors of their
        adapted per-task weights, which the edge problems see as the lower parameters."""
        tasks = () if self.unroller is None else tuple(
            low for low in self.nodes[name].lowers if low in self.unroller.task_only)
        if not tasks and not override:  # the common case, once per upper step: nothing to swap
            return contextlib.nullcontext()
        return self._swapped_weights(name, tasks, override)

    @contextlib.contextmanager
    def _swapped_weights(self, name: str, tasks: tuple[str, ...], override: bool
                         ) -> Iterator[None]:
        for lower in tasks:
            leaves = self.unroller.task_leaves(lower)
            self.params[lower] = leaves
            edge = self.edges[(name, lower)]
            edge.lower_params, edge.tasks = leaves, blocks.layout(leaves)
        try:
            with self._leaf_fast_weights(name, override):
                yield
        finally:
            for lower in tasks:
                self.params[lower] = self.nodes[lower].params
                edge = self.edges[(name, lower)]
                edge.lower_params, edge.tasks = self.nodes[lower].params, None
                self.unroller.fast[lower] = self.unroller.end[lower]
