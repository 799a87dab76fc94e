"""``ml.program``: the traced, immutable program and what a user does with it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mlodsl import checkpoint, errors
from mlodsl.compile import Schedule, compile_schedule
from mlodsl.dsl import Level
from mlodsl.history import History
from mlodsl.ir import Edge, Graph, LevelNode, Read
from mlodsl.run import Interpreter
from mlodsl.trace import trace

if TYPE_CHECKING:
    from mlodsl.viz import LevelGraph


class Program:
    """A traced multilevel program. Its structure is immutable; running it advances its state.

    Build one with :func:`program`. ``print(program)`` shows its levels, edges and schedule.
    """

    __slots__ = ("_graph", "_schedule", "_interpreter")

    def __init__(self, graph: Graph) -> None:
        self._graph = graph
        self._schedule = compile_schedule(
            order=[n.name for n in graph.levels],
            lowers={n.name: n.lowers for n in graph.levels},
            inner_steps={n.name: n.inner_steps for n in graph.levels},
            methods={n.name: n.method.name if n.method else None for n in graph.levels},
        )
        self._interpreter: Interpreter | None = None

    # -- structure -----------------------------------------------------------------------------

    @property
    def levels(self) -> tuple[LevelNode, ...]:
        """The traced levels, bottom-up (each after the levels below it)."""
        return self._graph.levels

    @property
    def edges(self) -> tuple[Edge, ...]:
        """The ``upper_of`` edges, each with its hypergradient method."""
        return self._graph.edges

    @property
    def reads(self) -> tuple[Read, ...]:
        """The data edges: which level's function receives which level's handle."""
        return self._graph.reads

    @property
    def options(self) -> Any:
        """The program options given to :func:`program` (read-only)."""
        return self._graph.options

    @property
    def schedule(self) -> Schedule:
        """The compiled schedule (same as :meth:`compile`)."""
        return self._schedule

    def compile(self) -> Schedule:
        """The loop schedule: which level steps when, and which hypergradient hook it fires.

        Example:
            >>> print(program.compile())
            schedule (repeats every 5 program steps):
              every step       classifier  step
              every 5 steps    hpo         step  <- hypergradient (cg) through classifier
        """
        return self._schedule

    def level(self, name: str | Level) -> LevelNode:
        """The traced level called ``name`` (or traced from the given :class:`Level`)."""
        key = name.level_name if isinstance(name, Level) else name
        try:
            return self._graph.level(key)
        except KeyError:
            names = [n.name for n in self.levels]
            raise errors.UnknownLevelError(
                f"this program has no level '{key}'.{errors.did_you_mean(key, names)} "
                f"Levels: {errors.listing(names)}."
            ) from None

    # -- running -------------------------------------------------------------------------------

    @property
    def _runtime(self) -> Interpreter:
        if self._interpreter is None:
            self._interpreter = Interpreter(self, self._graph)
        return self._interpreter

    def run(self, steps: int) -> History:
        """Run ``steps`` program steps (steps of the lowest levels) and every upper update the
        schedule implies. Calling it again continues where the previous call stopped.

        Returns:
            The program's :class:`History` (all steps so far).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"run(steps=...) needs a non-negative integer, got {steps!r}")
        return self._runtime.run(steps)

    def hypergrad(self, level: str | Level) -> tuple[torch.Tensor, ...]:
        """Compute, without applying, the gradient ``level`` would use now.

        For an upper level this is its hypergradient (direct term plus every path through the
        levels below it); for a lowest level, the plain gradient of its loss. Uses each level's
        latest batch (fetching one if it has not stepped yet).

        Returns:
            One tensor per trainable parameter of the level, in module order.
        """
        runtime = self._runtime
        with runtime.dist.active():  # collective in a distributed run: call it on every rank
            return runtime.hypergrad(self.level(level).name)

    @property
    def history(self) -> History:
        """Per-level metrics of every step run so far."""
        return self._runtime.history

    @property
    def stopped(self) -> str | None:
        """Why the last ``run`` ended early (early stopping), or ``None``."""
        return self._runtime.stopped

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the whole run to ``path``, atomically (a temporary file, then a rename).

        Holds every level's parameters and buffers, optimizer, scheduler and loss-scaler
        states, data positions (batch of epoch, with the epoch's shuffling order), step
        counters, solver states (CG warm starts, eigenvalue estimates), random states and the
        history. :meth:`load` (or :func:`mlodsl.load`) continues exactly as if never stopped.

        Returns:
            The path written.

        In a distributed run call it on every rank: rank 0 writes the file, and every rank
        returns once it is written.
        """
        return self._runtime.save(path)

    def load(self, path: str | os.PathLike[str]) -> Program:
        """Restore a run saved by :meth:`save` (or a periodic checkpoint; a folder means its
        newest). Loads with ``torch.load(weights_only=True)``: a checkpoint cannot run code.

        Raises:
            CheckpointError: the file is missing, truncated, tampered with, or from a program
                with other levels or parameter shapes.
        """
        runtime = self._runtime
        state, where = checkpoint.read(path, map_location=runtime.device)
        checkpoint.restore(runtime, state, where)
        runtime.check_in_sync(f"after loading {where}")  # every rank read the same state
        return self

    @property
    def steps(self) -> dict[str, int]:
        """Steps taken so far: ``"program"`` plus one entry per level."""
        runtime = self._runtime
        return {"program": runtime.global_step, **runtime.level_steps}

    # -- showing -------------------------------------------------------------------------------

    def visualize(self, *, direction: str = "TB", detail: str = "full") -> LevelGraph:
        """The level graph: one node per level, one edge per ``upper_of``, live figures after
        a run. Renders inline in Jupyter; ``print`` it for text, ``.save("g.svg")`` to keep it.

        Args:
            direction: ``"TB"`` (top level on top), ``"LR"``, ``"BT"`` or ``"RL"``.
            detail: ``"full"`` or ``"compact"`` (names, methods, steps and losses).

        Returns:
            A :class:`mlodsl.viz.LevelGraph` snapshot (see it for SVG/PNG/Mermaid export).
        """
        from mlodsl.viz import LevelGraph
        return LevelGraph(self, direction=direction, detail=detail)

    def __repr__(self) -> str:
        width = max(len(n.name) for n in self.levels)
        lines = [f"Program: {len(self.levels)} level(s), {len(self.edges)} edge(s)", "levels:"]
        for node in reversed(self.levels):
            lines.append(f"  {node.name:<{width}}  {node.describe()}  ({node.defined_at})")
        if self.edges:
            lines.append("edges (upper -> lower):")
            for edge in self.edges:
                inner = self.level(edge.upper).inner_steps
                lines.append(f"  {edge.upper} -> {edge.lower}  grad={edge.method}  "
                             f"inner_steps={inner}")
        if self.reads:
            lines.append("reads:")
            for node in reversed(self.levels):
                if node.reads:
                    lines.append(f"  {node.name} reads {', '.join(node.reads)}")
        lines.append(str(self._schedule))
        from mlodsl.viz import render_text
        lines += ["graph:", *("  " + line for line in render_text(self).splitlines())]
        return "\n".join(lines)


def program(*levels: Level, **options: Any) -> Program:
    """Trace decorated levels into a validated, immutable :class:`Program`.

    Args:
        *levels: The levels (functions decorated with :func:`mlodsl.level`).
        **options: ``device`` (where modules and batches go); ``seed`` (seeds torch, Python
            and NumPy before the first step: CPU runs are bit-reproducible); ``hooks``
            (objects with ``on_run_start``, ``on_step_end``, ``on_hypergrad``,
            ``on_validation``, ``on_checkpoint``, ``on_run_end`` methods); ``progress``
            (``True``/``False``; default: a bar on runs of 100+ steps in a terminal or
            notebook); ``validation`` (a function of level handles, ``program`` and/or
            ``step`` returning a dict of metrics, run under ``torch.no_grad`` with modules in
            eval mode) with ``validate_every`` (program steps) and ``early_stopping``
            (:class:`mlodsl.EarlyStopping`); ``checkpoint_dir`` with ``checkpoint_every``
            (program steps) and ``keep_checkpoints`` (default 3) for periodic checkpoints;
            ``on_nonfinite`` (``"raise"``, the default, or ``"skip"`` a NaN/inf update);
            ``distributed`` (``"ddp"``, :func:`mlodsl.distributed.ddp` with options, ``False``,
            or ``None``: data parallel when launched by ``torchrun``; see
            ``docs/distributed.md``).

    Returns:
        The program.

    Raises:
        TraceError: a subclass naming what is wrong, where, and the fix (unknown level,
            unknown parameter, duplicate names, cycles, missing module or optimizer, shared
            parameters).

    Example:
        >>> prog = ml.program(classifier, hpo)
        >>> prog.run(steps=1000)
    """
    if not levels:
        raise errors.InvalidLevelError("ml.program needs at least one level")
    return Program(trace(levels, options))


def load(path: str | os.PathLike[str], *levels: Level, **options: Any) -> Program:
    """Trace ``levels`` into a program (as :func:`program` does) and restore a saved run.

    Example:
        >>> prog = ml.load("runs/step-000001000.pt", classifier, hpo)
        >>> prog.run(steps=1000)              # continues exactly where the saved run was
    """
    return program(*levels, **options).load(path)
