"""The interpreter: walks the compiled schedule, calls level functions, applies updates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mlodsl.compile import Action
from mlodsl.data import DataStream
from mlodsl.errors import LossError
from mlodsl.handles import LevelHandle
from mlodsl.history import History
from mlodsl.hooks import HookSet, ProgressBar, wants_progress
from mlodsl.hypergrad.base import EdgeProblem, GraphView
from mlodsl.hypergrad.chain import total_hypergrad
from mlodsl.ir import Graph, LevelNode

_NOT_A_LOSS = (
    "level '{name}' ({where}) returned {what}; a level function must return a scalar loss "
    "tensor or a dict with a 'loss' entry (plus metrics to log)."
)
_NOT_SCALAR = (
    "level '{name}' ({where}) returned a loss of shape {shape}; it must be a scalar. Reduce it, "
    "e.g. with .mean() or .sum()."
)
_NO_GRAD = (
    "level '{name}' ({where}) returned a loss that does not require grad, so nothing can be "
    "learned from it. Compute it from the level's parameters (not under torch.no_grad() or "
    "from .detach()ed values)."
)


def _add_note(error: BaseException, note: str) -> None:
    notes = getattr(error, "__notes__", None) or []
    if any(n.startswith("mlodsl: ") for n in notes):
        return  # the innermost level already said where it happened
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10
        error.__notes__ = [*notes, note]  # type: ignore[attr-defined]


class Interpreter:
    """Runtime state of a program: counters, data positions, batches, solver state, history."""

    def __init__(self, program: Any, graph: Graph) -> None:
        self.program = program
        self.graph = graph
        self.schedule = program.schedule
        options = graph.options
        self.device = None if options.get("device") is None else torch.device(options["device"])
        if options.get("seed") is not None:
            torch.manual_seed(options["seed"])
        self.nodes: dict[str, LevelNode] = {n.name: n for n in graph.levels}
        if self.device is not None:
            for node in graph.levels:
                _move_module(node, self.device)
        self.streams = {n.name: DataStream(n.data, n.name, n.defined_at, self.device)
                        for n in graph.levels}
        self.handles = {n.name: LevelHandle(n.name, n.module) for n in graph.levels}
        self.static_kwargs = {n.name: {a.name: self.handles[a.target] for a in n.arguments
                                       if a.kind == "level"} for n in graph.levels}
        self.batch_param = {n.name: next((a.name for a in n.arguments if a.kind == "batch"), None)
                            for n in graph.levels}
        self.reserved = {n.name: tuple((a.name, a.target) for a in n.arguments
                                       if a.kind == "reserved") for n in graph.levels}
        self.batches: dict[str, Any] = {}
        self.level_steps = {n.name: 0 for n in graph.levels}
        self.global_step = 0
        self.history = History(tuple(self.nodes))
        self.params = {n.name: n.params for n in graph.levels}
        self.lowers = {n.name: n.lowers for n in graph.levels}
        self.methods = {n.name: n.method for n in graph.levels if n.method is not None}
        self.where = {n.name: n.defined_at for n in graph.levels}
        self.edges = {(e.upper, e.lower): EdgeProblem(
            upper=e.upper, lower=e.lower, upper_params=self.params[e.upper],
            lower_params=self.params[e.lower], lower_loss=self._lower_loss_fn(e.lower, e.upper),
            lower_optimizer=self.nodes[e.lower].optimizer, lower_module=self.nodes[e.lower].module)
            for e in graph.edges}
        self.view = GraphView(params=self.params,
                              below={a.level: a.below for a in self.schedule.actions},
                              loss=self._loss_for_hypergrad)
        self.user_hooks = HookSet(options.get("hooks") or ())

    # -- running -----------------------------------------------------------------------------

    def run(self, steps: int) -> History:
        hooks = self.user_hooks
        if wants_progress(self.graph.options.get("progress"), steps):
            hooks = HookSet((*hooks.hooks, ProgressBar()))
        hooks.fire("on_run_start", program=self.program, steps=steps)
        try:
            actions = self.schedule.actions
            for _ in range(steps):
                self.global_step += 1
                step = self.global_step
                for action in actions:
                    if step % action.every == 0:
                        self._step(action, hooks)
        finally:
            hooks.fire("on_run_end", program=self.program, history=self.history)
        return self.history

    def _step(self, action: Action, hooks: HookSet) -> None:
        name = action.level
        batch = self.streams[name].next()
        self.batches[name] = batch
        record = self.update(name, batch, hooks)
        self.level_steps[name] += 1
        record["step"] = self.level_steps[name]
        record["global_step"] = self.global_step
        self.history.append(name, record)
        hooks.fire("on_step_end", program=self.program, level=name,
                   step=self.level_steps[name], metrics=record)

    def update(self, name: str, batch: Any, hooks: HookSet | None = None,
               schedulers: bool = True) -> dict[str, Any]:
        """One optimizer step of ``name`` on ``batch`` (hypergradient for upper levels).

        Counters, data and history are left to the caller. Returns the step's record.
        """
        node = self.nodes[name]
        loss, record = self._evaluate(node, batch)
        if self.view.below[name]:
            grads, diagnostics = self._hypergrad(node, loss)
            for p, g in zip(node.params, grads):
                p.grad = g
            record.update(diagnostics)
            if hooks is not None:
                hooks.fire("on_hypergrad", program=self.program, level=name,
                           step=self.level_steps[name] + 1, grads=grads,
                           diagnostics=diagnostics)
        else:
            node.optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=node.params)
        if node.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(node.params, node.clip_grad_norm)
        node.optimizer.step()
        if schedulers and node.scheduler is not None:
            _step_scheduler(node.scheduler, loss)
        return record

    # -- evaluating levels -------------------------------------------------------------------

    def _evaluate(self, node: LevelNode, batch: Any, context: str = ""
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Call the level's function; return its loss and a record of its metrics."""
        name = node.name
        kwargs = dict(self.static_kwargs[name])
        batch_param = self.batch_param[name]
        if batch_param is not None:
            kwargs[batch_param] = batch
        for param, reserved in self.reserved[name]:
            kwargs[param] = self._reserved(name, reserved)
        try:
            out = node.fn(**kwargs)
            return _split_loss(node, out)
        except Exception as error:
            when = (f"after its step {self.level_steps[name]}" if context
                    else f"at its step {self.level_steps[name] + 1}")
            _add_note(error, f"mlodsl: while running level '{name}' ({node.defined_at}){context} "
                             f"{when} (program step {self.global_step})")
            raise

    def _reserved(self, level: str, reserved: str) -> int:
        if reserved == "step":
            return self.level_steps[level]
        if reserved == "epoch":
            return self.streams[level].epoch
        return self.global_step

    def _current_batch(self, name: str) -> Any:
        if name not in self.batches:
            self.batches[name] = self.streams[name].next()
        return self.batches[name]

    def _lower_loss_fn(self, lower: str, upper: str) -> Any:
        node = self.nodes[lower]
        context = f" for the hypergradient of '{upper}'"

        def lower_loss() -> torch.Tensor:
            return self._evaluate(node, self._current_batch(lower), context)[0]

        return lower_loss

    def _hypergrad(self, node: LevelNode, loss: torch.Tensor,
                   methods: Mapping[str, Any] | None = None
                   ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        return total_hypergrad(loss, node.name, self.view, self.lowers,
                               self.methods if methods is None else methods, self._edge,
                               self.where)

    def _loss_for_hypergrad(self, name: str) -> torch.Tensor:
        return self._evaluate(self.nodes[name], self._current_batch(name),
                              " for a hypergradient")[0]

    def _edge(self, upper: str, lower: str) -> EdgeProblem:
        return self.edges[(upper, lower)]

    def hypergrad(self, name: str, methods: Mapping[str, Any] | None = None
                  ) -> tuple[torch.Tensor, ...]:
        """The gradient ``name`` would apply now (hypergradient for upper levels).

        ``methods`` overrides the levels' hypergradient methods for this call.
        """
        node = self.nodes[name]
        loss, _ = self._evaluate(node, self._current_batch(name))
        if self.view.below[name]:
            grads, _ = self._hypergrad(node, loss, methods)
        else:
            raw = torch.autograd.grad(loss, node.params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(raw, node.params)]
        return tuple(g.detach() for g in grads)


def _split_loss(node: LevelNode, out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    if type(out) is torch.Tensor and out.ndim == 0 and out.requires_grad:  # the common case
        return out, {"loss": out.detach()}
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise LossError(_NOT_A_LOSS.format(
                name=node.name, where=node.defined_at,
                what=f"a dict without a 'loss' entry (keys: {', '.join(map(str, out))})"))
        loss = out["loss"]
        record = {k: v.detach() if isinstance(v, torch.Tensor) else v
                  for k, v in out.items() if k != "loss"}
    else:
        loss, record = out, {}
    if not isinstance(loss, torch.Tensor):
        raise LossError(_NOT_A_LOSS.format(name=node.name, where=node.defined_at,
                                           what=f"a {type(loss).__name__} ({loss!r:.40})"))
    if loss.ndim != 0:
        raise LossError(_NOT_SCALAR.format(name=node.name, where=node.defined_at,
                                           shape=tuple(loss.shape)))
    if not loss.requires_grad:
        raise LossError(_NO_GRAD.format(name=node.name, where=node.defined_at))
    record["loss"] = loss.detach()
    return loss, record


def _step_scheduler(scheduler: Any, loss: torch.Tensor) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(float(loss))
    else:
        scheduler.step()


def _move_module(node: LevelNode, device: torch.device) -> None:
    """Move a level's tensors in place, keeping their identity (the optimizer refers to them)."""
    if isinstance(node.module, torch.nn.Module):
        node.module.to(device)
        return
    with torch.no_grad():
        for p in node.params:
            if p.device != device:
                p.data = p.data.to(device)
