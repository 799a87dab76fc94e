"""The interpreter: walks the compiled schedule, calls level functions, applies updates.

A *program step* runs every level due at it, bottom-up. A level's update either commits (its
optimizer stepped, its counters advanced) or leaves no trace: on an error or Ctrl-C before the
commit its batches go back to its data stream and the run can simply be called again, resuming
inside the same program step.
"""

from __future__ import annotations

import math
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from mlodsl import autodiff, checkpoint, distributed, sharding
from mlodsl.compile import Action
from mlodsl.data import DataStream
from mlodsl.errors import NonFiniteError
from mlodsl.evaluation import Evaluation
from mlodsl.handles import LevelHandle
from mlodsl.history import History
from mlodsl.hooks import HookSet, ProgressBar, wants_progress
from mlodsl.log import loggers
from mlodsl.hypergrad.base import EdgeProblem, GraphView
from mlodsl.hypergrad.chain import carried_edges
from mlodsl.interrupts import DeferredInterrupt
from mlodsl.ir import Graph, LevelNode
from mlodsl.levelcall import mean_record
from mlodsl.precision import Precision
from mlodsl.task_steps import TaskSteps
from mlodsl.unrolled import Unroller
from mlodsl.unrolled_steps import UnrolledSteps
from mlodsl.validation import EarlyStopper, Validator, validation_params

_NON_FINITE = (
    "level '{name}' ({where}) produced a non-finite {what} ({value}) at its step {step} "
    "(program step {global_step}); nothing was applied, the parameters are those of the last "
    "good step. Lower the learning rate, clip gradients (clip_grad_norm=...), or pass "
    "on_nonfinite='skip' to ml.program to skip such updates."
)


class Interpreter(UnrolledSteps, TaskSteps, Evaluation):
    """Runtime state of a program: counters, data positions, batches, solver state, history."""

    def __init__(self, program: Any, graph: Graph) -> None:
        self.program = program
        self.graph = graph
        self.schedule = program.schedule
        options = graph.options
        device = None if options.get("device") is None else torch.device(options["device"])
        # Joins the process group when distributed (and picks this rank's GPU).
        self.dist = distributed.Context(distributed.resolve(options.get("distributed")), device)
        self.device = self.dist.device
        if options.get("seed") is not None:
            _seed_everything(options["seed"])
        self.nodes: dict[str, LevelNode] = {n.name: n for n in graph.levels}
        if self.device is not None:
            for node in graph.levels:
                _move_module(node, self.device)
        data = {n.name: n.data if not self.dist.enabled else sharding.shard(
            n.data, n.name, n.defined_at, self.dist.rank, self.dist.world,
            options.get("seed") or 0) for n in graph.levels}
        self.dist.start(graph, data)
        self.streams = {n.name: DataStream(data[n.name], n.name, n.defined_at, self.device)
                        for n in graph.levels}
        self.handles = {n.name: LevelHandle(n.name, n.module) for n in graph.levels}
        self.static_kwargs = {n.name: {a.name: self.handles[a.target] for a in n.arguments
                                       if a.kind == "level"} for n in graph.levels}
        self.batch_param = {n.name: next((a.name for a in n.arguments if a.kind == "batch"), None)
                            for n in graph.levels}
        self.reserved = {n.name: tuple((a.name, a.target) for a in n.arguments
                                       if a.kind == "reserved") for n in graph.levels}
        self.precision = {n.name: Precision(n.precision, n.params[0].device.type)
                          for n in graph.levels}
        self.batches: dict[str, tuple[Any, ...]] = {}
        self.level_steps = {n.name: 0 for n in graph.levels}
        self.global_step = 0
        self.partial: tuple[int, int] | None = None  # (program step, next action) mid-step
        self.stopped: str | None = None
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
        self.unroller = (Unroller(self.nodes, self.methods)
                         if any(getattr(m, "unrolls", False) for m in self.methods.values())
                         or any(n.tasks for n in graph.levels) else None)
        if self.unroller is not None:
            self.unroller.reduce = self.dist.average_inner
        below = {a.level: a.below for a in self.schedule.actions}
        self.every = {a.level: a.every for a in self.schedule.actions}  # program steps apart
        self.view = GraphView(params=self.params, below=below, loss=self._loss_for_hypergrad,
                              carried=carried_edges({n.name: n.reads for n in graph.levels},
                                                    below, self.lowers))
        # init_from levels that are not unrolled restart by copying (iMAML); unrolled and
        # task-batch ones restart inside the Unroller.
        unrolled = set() if self.unroller is None else set(self.unroller.names)
        self.restarted_by = {n.name: tuple(low for low in n.lowers
                                           if self.nodes[low].init_from == n.name
                                           and low not in unrolled) for n in graph.levels}
        for upper, lowers in self.restarted_by.items():
            for lower in lowers:
                self._restart_from(lower, upper)
        self.on_nonfinite = options.get("on_nonfinite") or "raise"
        self.validator = None
        if options.get("validation") is not None:
            self.validator = Validator(options["validation"], options["validate_every"],
                                       validation_params(options["validation"], self.nodes),
                                       self.handles, [n.module for n in graph.levels])
        stopping = options.get("early_stopping")
        self.early_stopper = EarlyStopper(stopping) if stopping is not None else None
        self.checkpoint_dir = options.get("checkpoint_dir")
        self.checkpoint_every = options.get("checkpoint_every")
        self.keep_checkpoints = options.get("keep_checkpoints") or 3
        self.interrupt = DeferredInterrupt()
        self.committed = False
        # Loggers (and the progress bar) on rank 0 only; the user's own hooks on every rank.
        self.user_hooks = HookSet((*(options.get("hooks") or ()),
                                   *(loggers(options.get("logger")) if self.dist.is_main
                                     else ())))

    # -- running -----------------------------------------------------------------------------

    def run(self, steps: int) -> History:
        hooks = self.user_hooks
        if self.dist.is_main and wants_progress(self.graph.options.get("progress"), steps):
            hooks = HookSet((*hooks.hooks, ProgressBar()))
        self.stopped = None
        with self.interrupt, self.dist.active():
            hooks.fire("on_run_start", program=self.program, steps=steps)
            try:
                if self.partial is not None:  # finish the program step a failure cut short
                    self._program_step(*self.partial, hooks)
                for _ in range(steps):
                    if self.stopped is not None:
                        break
                    self.global_step += 1
                    self._program_step(self.global_step, 0, hooks)
            finally:
                hooks.fire("on_run_end", program=self.program, history=self.history)
        self.check_in_sync(f"after run() ended at program step {self.global_step}")
        return self.history

    def _program_step(self, step: int, start: int, hooks: HookSet) -> None:
        actions = self.schedule.actions
        for index in range(start, len(actions)):
            action = actions[index]
            if step % action.every == 0 and step > self.nodes[action.level].warmup:
                self.partial = (step, index)
                self._step(action, index, hooks)
                self.interrupt.check()
        self.partial = (step, len(actions))
        if self.validator is not None and step % self.validator.every == 0:
            self._validate(step, hooks)
        self.partial = None
        if self.checkpoint_every is not None and step % self.checkpoint_every == 0:
            path = self.save(checkpoint.periodic_path(self.checkpoint_dir, step))
            if self.dist.is_main:
                checkpoint.prune(self.checkpoint_dir, self.keep_checkpoints)
            hooks.fire("on_checkpoint", program=self.program, step=step, path=path)
        every = self.dist.config.check_every if self.dist.enabled else None
        if every is not None and step % every == 0:
            self.check_in_sync(f"after program step {step}")
        self.interrupt.check()

    def save(self, path: Any) -> Path:
        """Write a checkpoint (rank 0 writes; every rank returns once it is on disk)."""
        self.check_in_sync("before a checkpoint")
        state = checkpoint.capture(self)
        if self.dist.is_main:
            path = checkpoint.write(state, path)
        self.dist.barrier("the barrier after rank 0 wrote a checkpoint")
        return Path(path)

    def check_in_sync(self, when: str) -> None:
        """Distributed runs: raise if any level's parameters differ between ranks."""
        self.dist.check_in_sync({name: n.params for name, n in self.nodes.items()}, when)

    def _step(self, action: Action, index: int, hooks: HookSet) -> None:
        name = action.level
        node = self.nodes[name]
        stream = self.streams[name]
        micro = ((stream.next(),) if node.accumulate == 1
                 else tuple(stream.next() for _ in range(node.accumulate)))
        if self.dist.enabled:  # named in the error if a collective fails
            self.dist.at = f"level '{name}', its step {self.level_steps[name] + 1}"
        self.batches[name] = micro
        self.committed = False
        try:
            record = self.update(name, micro, hooks)
        except BaseException:
            if not self.committed:  # nothing applied: the batches are used again next time
                stream.push_back(*micro)
            raise
        self.level_steps[name] += 1
        self.partial = (self.partial[0], index + 1)  # committed: a retry moves on
        if node.scheduler is not None and not record.get("skipped"):
            if self.unroller is None or name not in self.unroller.upper_of:
                _step_scheduler(node.scheduler, record["loss"])
            else:
                with warnings.catch_warnings():
                    # An unrolled level steps through its optimizer's differentiable twin, so
                    # torch would warn that the scheduler stepped before optimizer.step().
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                    _step_scheduler(node.scheduler, record["loss"])
        record["step"] = self.level_steps[name]
        record["global_step"] = self.partial[0]
        self.history.append(name, record)
        hooks.fire("on_step_end", program=self.program, level=name,
                   step=self.level_steps[name], metrics=record)

    def update(self, name: str, micro: tuple[Any, ...], hooks: HookSet | None = None
               ) -> dict[str, Any]:
        """One optimizer step of ``name`` on its micro-batches ``micro`` (the hypergradient for
        upper levels), gradients averaged over them. Sets ``committed`` once the optimizer
        stepped; counters, data and history are left to the caller. Returns the step's record.
        """
        node = self.nodes[name]
        if self.unroller is not None and name in self.unroller.names:
            return (self._task_update(name, micro) if name in self.unroller.task_only
                    else self._unrolled_update(name, micro, hooks))
        scaler = self.precision[name].scaler
        count = len(micro)
        records = []
        if self.view.below[name]:
            total: list[torch.Tensor] | None = None
            for index, batch in enumerate(micro):
                with self._upper_weights(name):
                    loss, record = self._evaluate_upper(node, batch)
                    self.dist.average_(record)  # the global batch's loss and metrics
                    scale = 1.0
                    if scaler is not None:  # scaled hypergradients; the scaler unscales them
                        loss, scale = scaler.scale(loss), scaler.get_scale()
                    grads, diagnostics = self._hypergrad(node, loss, retain=index + 1 < count)
                norm = diagnostics.pop("hypergrad_norm")
                if scaler is None and not (math.isfinite(norm.item())
                                           and math.isfinite(record["loss"].item())):
                    if not self._finite(record["loss"], name, "loss") or not self._finite(
                            norm, name, "hypergradient"):
                        self._restart_lowers(name)  # the trajectories led nowhere
                        return self._skip(record)
                record["hypergrad_norm"] = norm if scale == 1.0 else norm / scale
                record.update(diagnostics)
                records.append(record)
                if count == 1:
                    total = grads
                elif total is None:
                    total = [g / count for g in grads]
                else:
                    for t, g in zip(total, grads):
                        t.add_(g, alpha=1.0 / count)
            for p, g in zip(node.params, total):
                p.grad = g
            if hooks is not None:
                hooks.fire("on_hypergrad", program=self.program, level=name,
                           step=self.level_steps[name] + 1, grads=total,
                           diagnostics=records[-1])
        else:
            node.optimizer.zero_grad(set_to_none=True)
            for batch in micro:
                loss, record = self._evaluate(node, batch)
                if count > 1:
                    loss = loss / count
                autodiff.backward(loss if scaler is None else scaler.scale(loss), node.params)
                records.append(record)
            records = [mean_record(records)]
            # Distributed: the global batch's gradient, loss and metrics (one all-reduce), so
            # the finiteness check below decides the same on every rank.
            self.dist.average_(records[0], node.params)
            if scaler is None and not math.isfinite(records[0]["loss"].item()):
                node.optimizer.zero_grad(set_to_none=True)  # no trace of it, even on raise
                self._finite(records[0]["loss"], name, "loss")  # raises unless 'skip'
                return self._skip(records[0])
        if node.clip_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(node.optimizer)
            torch.nn.utils.clip_grad_norm_(node.params, node.clip_grad_norm)
        if scaler is None:
            node.optimizer.step()
        else:
            scaler.step(node.optimizer)
            scaler.update()
        self.committed = True
        self._restart_lowers(name)
        return mean_record(records)

    def _finite(self, value: torch.Tensor, name: str, what: str) -> bool:
        number = value.item()
        if math.isfinite(number):
            return True
        if self.on_nonfinite == "skip":
            return False
        node = self.nodes[name]
        raise NonFiniteError(_NON_FINITE.format(
            name=name, where=node.defined_at, what=what, value=number,
            step=self.level_steps[name] + 1, global_step=self.global_step))

    def _skip(self, record: dict[str, Any]) -> dict[str, Any]:
        """A non-finite step skipped by option: counted, nothing applied."""
        self.committed = True
        record["skipped"] = 1
        return record

    def _validate(self, step: int, hooks: HookSet) -> None:
        # Rank 0 validates; every rank gets its figures, so early stopping agrees everywhere.
        metrics = self.validator(self.program, step) if self.dist.is_main else None
        metrics = self.dist.broadcast_object(metrics, "the broadcast of rank 0's validation")
        self.history.validation.append({"global_step": step, **metrics})
        hooks.fire("on_validation", program=self.program, step=step, metrics=metrics)
        if self.early_stopper is not None:
            self.stopped = self.early_stopper.update(metrics)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)


def _step_scheduler(scheduler: Any, loss: Any) -> None:
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
