"""How the interpreter runs levels that an upper level unrolls (``grad="unroll"``).

Mixed into :class:`mlodsl.run.Interpreter`: these methods use its levels, data, evaluation and
:class:`mlodsl.unrolled.Unroller`. Kept apart so the interpreter's own loop stays one idea.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mlodsl.errors import NoDependencyError
from mlodsl.hypergrad import kernels
from mlodsl.ir import LevelNode
from mlodsl.levelcall import mean_record, split_loss
from mlodsl.unrolled import task_leaves


class UnrolledSteps:
    """Interpreter methods for unrolled levels (a mixin of :class:`~mlodsl.run.Interpreter`)."""

    unroller: Any
    nodes: dict[str, LevelNode]

    def _unrolled_update(self, name: str, micro: tuple[Any, ...]) -> dict[str, Any]:
        """A functional, differentiable step of a level its upper unrolls."""
        node = self.nodes[name]
        upper = self.unroller.upper_of[name]
        every = {a.level: a.every for a in self.schedule.actions}
        records: list[dict[str, Any]] = []

        def loss_of() -> torch.Tensor:
            # May also run during a backward pass (checkpoint=True recomputes the step, and may
            # stop part-way): keep the records of a complete evaluation only.
            losses, fresh = [], []
            for batch in micro:
                loss, record = self._evaluate(node, batch)
                losses.append(loss)
                fresh.append(record)
            records[:] = fresh
            return losses[0] if len(losses) == 1 else sum(losses) / len(losses)

        position, count = self.unroller.taken.get(name, 0), every[upper] // every[name]
        if node.tasks:
            def loss_for(task: Any) -> torch.Tensor:
                return self._evaluate(node, task, per_task=True)[0]

            losses = self.unroller.step_tasks(name, loss_for, micro[0], position, count)
            loss = losses.mean()
            records[:] = [{"loss": loss.detach()}]
        else:
            loss = self.unroller.step(name, loss_of, position, count)
        if not self._finite(loss, name, "loss"):
            return self._skip(mean_record(records))
        self.committed = True
        if self.global_step <= self.nodes[upper].warmup:
            self.unroller.finish(name)  # the upper is warming up: nothing to differentiate yet
        return mean_record(records)

    def _evaluate_upper(self, node: LevelNode, batch: Any, context: str = ""
                        ) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`_evaluate`, but per task and averaged when ``node`` unrolls a ``tasks=True``
        level: each task's loss sees that task's adapted weights."""
        lower = None if self.unroller is None else self.unroller.tasks_lower(node.name)
        if lower is None:
            return self._evaluate(node, batch, context)
        batched = self.unroller.fast[lower]
        leaves, rebuild = task_leaves(batch, node.name, node.defined_at)
        n, names = len(batched), []  # flat inputs and outputs: vmap's pytree handling is slow

        def one_task(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            self.unroller.fast[lower] = inputs[:n]
            task = rebuild(inputs[n:])
            loss, record = self._evaluate(node, task, context, per_task=True)
            names[:] = [k for k, v in record.items()
                        if k != "loss" and isinstance(v, torch.Tensor)]
            return (loss, *(record[k] for k in names))

        try:
            losses, *values = torch.func.vmap(one_task)(*batched, *leaves)
        finally:
            self.unroller.fast[lower] = batched
        return split_loss(node, {**{k: v.mean() for k, v in zip(names, values)},
                                 "loss": losses.mean()})

    def _unrolled_hypergrad(self, node: LevelNode, loss: torch.Tensor
                            ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """When everything below ``node`` is unrolled by it, one backward pass from its loss
        (computed on the trajectories' ends) gives the total derivative directly."""
        raw = torch.autograd.grad(loss, node.params, allow_unused=True)
        lowers = self.unroller.unrolled_by(node.name)
        if all(g is None for g in raw):
            raise NoDependencyError(
                f"the loss of level '{node.name}' ({node.defined_at}) depends on its parameters "
                f"neither directly nor through the unrolled steps of {', '.join(lowers)}: its "
                "hypergradient is zero. Read the lower level in its loss, and the upper level "
                "in the lower's loss (or use init_from).")
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(raw, node.params)]
        diagnostics: dict[str, Any] = {f"{node.name}->{lower}/unrolled_steps":
                                       self.unroller.taken.get(lower, 0) for lower in lowers}
        diagnostics["hypergrad_norm"] = torch.linalg.vector_norm(kernels.flat(grads))
        return grads, diagnostics

    @contextlib.contextmanager
    def _leaf_fast_weights(self, name: str, override: bool = False) -> Iterator[None]:
        """With other methods than its own (``override``: a reference in check_hypergrad),
        ``name``'s unrolled lowers run on leaf copies of their fast weights, so that partial
        derivatives w.r.t. them exist for those methods. Its own unrolled hypergradient needs
        none: one backward pass through the trajectories does it."""
        lowers = self.unroller.unrolled_by(name) if self.unroller is not None and override else ()
        for lower in lowers:
            leaves = self.unroller.leaf_copies(lower)
            self.params[lower] = leaves
        try:
            yield
        finally:
            for lower in lowers:
                self.params[lower] = self.nodes[lower].params
                self.unroller.fast[lower] = self.unroller.end[lower]
