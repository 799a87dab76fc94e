"""How the interpreter runs levels that an upper level unrolls (``grad="unroll"``).

Mixed into :class:`mlodsl.run.Interpreter`: these methods use its levels, data, evaluation and
:class:`mlodsl.unrolled.Unroller`. Kept apart so the interpreter's own loop stays one idea.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mlodsl import autodiff, batching
from mlodsl.errors import NoDependencyError
from mlodsl.flatten import task_leaves
from mlodsl.hypergrad import kernels
from mlodsl.ir import LevelNode
from mlodsl.levelcall import mean_record, split_loss


class UnrolledSteps:
    """Interpreter methods for unrolled levels (a mixin of :class:`~mlodsl.run.Interpreter`)."""

    unroller: Any
    nodes: dict[str, LevelNode]
    level_steps: dict[str, int]
    every: dict[str, int]
    program: Any
    edges: dict[tuple[str, str], Any]
    dist: Any

    def _unrolled_update(self, name: str, micro: tuple[Any, ...], hooks: Any = None
                         ) -> dict[str, Any]:
        """A functional, differentiable step of a level its upper unrolls."""
        node = self.nodes[name]
        upper = self.unroller.upper_of[name]
        records: list[dict[str, Any]] = []
        # checkpoint=True recomputes the step during the upper's backward pass, when the
        # counters have moved on: the function must see this step's 'step', 'epoch', ...
        reserved = self.reserved_values(name)

        def loss_of() -> torch.Tensor:
            # May also run during a backward pass (checkpoint=True recomputes the step, and may
            # stop part-way): keep the records of a complete evaluation only.
            losses, fresh = [], []
            for batch in micro:
                loss, record = self._evaluate(node, batch, reserved=reserved)
                losses.append(loss)
                fresh.append(record)
            records[:] = fresh
            return losses[0] if len(losses) == 1 else sum(losses) / len(losses)

        position, count = self.unroller.since.get(name, 0), self.every[upper] // self.every[name]
        if node.tasks:
            def loss_for(task: Any) -> torch.Tensor:
                return self._evaluate(node, task, per_task=True)[0]

            losses = self.unroller.step_tasks(name, loss_for, micro[0], position, count)
            loss = losses.mean()
            records[:] = [{"loss": loss.detach()}]
        else:
            self.unroller.step(name, loss_of, position, count)
        record = mean_record(records)
        self.dist.average_(record)  # the global batch's figures: every rank decides alike
        if not self._finite(record["loss"], name, "loss"):
            return self._skip(record)
        self.committed = True
        lowers = self.unroller.unrolled_by(name)
        if lowers:  # nested: this step's gradient went through the steps of the levels below
            grads = self.unroller.grads[name]
            record["hypergrad_norm"] = torch.linalg.vector_norm(kernels.flat(grads))
            record.update({f"{name}->{lower}/unrolled_steps": self.unroller.since.get(lower, 0)
                           for lower in lowers})
            self.unroller.upper_stepped(name)
            if hooks is not None:
                hooks.fire("on_hypergrad", program=self.program, level=name,
                           step=self.level_steps[name] + 1, grads=list(grads), diagnostics=record)
        if self.global_step <= self.nodes[upper].warmup:
            self.unroller.finish(name)  # the upper is warming up: nothing to differentiate yet
        return record

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
            losses, *values = batching.flat_vmap(one_task, (0,) * (n + len(leaves)),
                                                 (*batched, *leaves))
        finally:
            self.unroller.fast[lower] = batched
        return split_loss(node, {**{k: v.mean() for k, v in zip(names, values)},
                                 "loss": losses.mean()})

    def _unrolled_hypergrad(self, node: LevelNode, loss: torch.Tensor, retain: bool = True
                            ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """When everything below ``node`` is unrolled by it, one backward pass from its loss
        (computed on the trajectories' ends) gives the total derivative directly."""
        # A level that is itself unrolled (nested) differentiates w.r.t. its fast weights, which
        # its lowers' steps read. ``retain`` keeps the trajectories' graph for another
        # micro-batch or, after an inspection (program.hypergrad), for the real update.
        unroller = self.unroller
        targets = (unroller.fast[node.name] if node.name in unroller.upper_of
                   and node.name in unroller.fast else node.params)
        raw = autodiff.grad(loss, targets, retain_graph=retain, allow_unused=True)
        lowers = self.unroller.unrolled_by(node.name)
        if all(g is None for g in raw):
            raise NoDependencyError(
                f"the loss of level '{node.name}' ({node.defined_at}) depends on its parameters "
                f"neither directly nor through the unrolled steps of {', '.join(lowers)}: its "
                "hypergradient is zero. Read the lower level in its loss, and the upper level "
                "in the lower's loss (or use init_from).")
        grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(raw, node.params)]
        # Distributed: each rank's backward pass holds its share of the derivative of the
        # global loss (the unrolled steps averaged their gradients differentiably); the mean
        # of the shares is that derivative.
        self.dist.mean_tensors_(grads, f"the all-reduce of the hypergradient of '{node.name}'")
        diagnostics: dict[str, Any] = {f"{node.name}->{lower}/unrolled_steps":
                                       self.unroller.since.get(lower, 0) for lower in lowers}
        diagnostics["hypergrad_norm"] = torch.linalg.vector_norm(kernels.flat(grads))
        return grads, diagnostics

    @contextlib.contextmanager
    def _leaf_fast_weights(self, name: str, override: bool = False) -> Iterator[None]:
        """With other methods than unrolling (``override``: a reference in check_hypergrad, or
        an implicit method of its own over a level that unrolls), the unrolled levels below
        ``name`` run on leaf copies of their fast weights, so that partial derivatives w.r.t.
        them exist for those methods. Its own unrolled hypergradient needs none: one backward
        pass through the trajectories does it."""
        lowers: tuple[str, ...] = ()
        if self.unroller is not None and (override or not self.unroller.unrolled_by(name)):
            lowers = tuple(low for low in self.view.below[name] if low in self.unroller.upper_of)
        edges = [edge for (_, lower), edge in self.edges.items() if lower in lowers]
        for lower in lowers:
            leaves = self.unroller.leaf_copies(lower)
            self.params[lower] = leaves
        for edge in edges:  # edge methods (cg, ...) differentiate w.r.t. these, too
            edge.lower_params = self.params[edge.lower]
        try:
            yield
        finally:
            for lower in lowers:
                self.params[lower] = self.nodes[lower].params
                self.unroller.fast[lower] = self.unroller.end[lower]
            for edge in edges:
                edge.lower_params = self.nodes[edge.lower].params
