"""How the interpreter calls level functions and computes the gradients it applies.

Mixed into :class:`mlodsl.run.Interpreter`: argument filling, error context, each level's loss
on its current batches (what hypergradient methods re-evaluate), and hypergradients. Kept apart
so the interpreter's module stays about the loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mlodsl import distributed
from mlodsl.hypergrad.base import EdgeProblem
from mlodsl.hypergrad.chain import total_hypergrad
from mlodsl.ir import LevelNode
from mlodsl.levelcall import add_note, split_loss


class Evaluation:
    """Interpreter methods that evaluate levels (a mixin of :class:`~mlodsl.run.Interpreter`)."""

    nodes: dict[str, LevelNode]

    def _evaluate(self, node: LevelNode, batch: Any, context: str = "", per_task: bool = False,
                  reserved: Mapping[str, int] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Call the level's function; return its loss and a record of its metrics.
        ``reserved`` fixes the reserved arguments (``step``, ...) instead of the current ones."""
        name = node.name
        kwargs = dict(self.static_kwargs[name])
        batch_param = self.batch_param[name]
        if batch_param is not None:
            kwargs[batch_param] = batch
        kwargs.update(self.reserved_values(name) if reserved is None else reserved)
        try:
            call = (node.fn if self.unroller is None or not self.unroller.active
                    else lambda **kw: self.unroller.call(node.fn, kw))
            if node.precision == "fp32":
                out = call(**kwargs)
            else:
                with self.precision[name].autocast():
                    out = call(**kwargs)
            return split_loss(node, out, require_grad=not per_task)
        except Exception as error:
            when = (f"after its step {self.level_steps[name]}" if context
                    else f"at its step {self.level_steps[name] + 1}")
            add_note(error, f"mlodsl: while running level '{name}' ({node.defined_at}){context} "
                            f"{when} (program step {self.global_step})")
            raise

    def reserved_values(self, level: str) -> dict[str, int]:
        """The reserved arguments of ``level``'s function now, by parameter name."""
        now = {"step": self.level_steps[level], "epoch": self.streams[level].epoch,
               "global_step": self.global_step}
        return {param: now[target] for param, target in self.reserved[level]}

    def current_batches(self, name: str) -> tuple[Any, ...]:
        """The micro-batches of ``name``'s latest step (fetching some if it has not stepped)."""
        if name not in self.batches:
            stream = self.streams[name]
            self.batches[name] = tuple(stream.next() for _ in range(self.nodes[name].accumulate))
        return self.batches[name]

    def loss_of(self, name: str, context: str = "") -> torch.Tensor:
        """``name``'s loss on its current micro-batches (their mean)."""
        node = self.nodes[name]
        micro = self.current_batches(name)
        if node.tasks and name in self.unroller.task_only:
            return self._task_loss(node, micro[0], context)
        if len(micro) == 1:
            return self._evaluate_upper(node, micro[0], context)[0]
        return sum(self._evaluate_upper(node, b, context)[0] for b in micro) / len(micro)

    def _lower_loss_fn(self, lower: str, upper: str) -> Any:
        context = f" for the hypergradient of '{upper}'"
        return lambda: self.loss_of(lower, context)

    def _loss_for_hypergrad(self, name: str) -> torch.Tensor:
        return self.loss_of(name, " for a hypergradient")

    def _hypergrad(self, node: LevelNode, loss: torch.Tensor,
                   methods: Mapping[str, Any] | None = None, retain: bool = True
                   ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """``node``'s hypergradient from its ``loss`` (inside :meth:`_upper_weights`);
        ``retain`` keeps an unrolled trajectory's graph for a later micro-batch or update."""
        if methods is None and self.unroller is not None and self.unroller.unrolled_by(node.name):
            return self._unrolled_hypergrad(node, loss, retain)
        return total_hypergrad(loss, node.name, self.view, self.lowers,
                               self.methods if methods is None else methods, self._edge,
                               self.where)

    def _edge(self, upper: str, lower: str) -> EdgeProblem:
        return self.edges[(upper, lower)]

    def hypergrad(self, name: str, methods: Mapping[str, Any] | None = None
                  ) -> tuple[torch.Tensor, ...]:
        """The gradient ``name`` would apply now (hypergradient for upper levels).

        ``methods`` overrides the levels' hypergradient methods for this call.
        """
        node = self.nodes[name]
        if self.view.below[name]:
            with self._upper_weights(name, override=methods is not None):
                grads, _ = self._hypergrad(node, self.loss_of(name), methods)
        else:
            loss = self.loss_of(name)
            raw = torch.autograd.grad(loss, node.params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(raw, node.params)]
            distributed.mean_all_(grads, f"the all-reduce of the gradient of '{name}'")
        return tuple(g.detach() for g in grads)
