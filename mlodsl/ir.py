"""The traced program's intermediate representation: frozen levels and edges."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mlodsl.hypergrad import HypergradMethod

BATCH = "batch"
RESERVED = ("step", "epoch", "global_step")


@dataclass(frozen=True)
class Argument:
    """How one parameter of a level function is filled.

    ``kind`` is ``"batch"``, ``"level"`` (``target`` names the level) or ``"reserved"``
    (``target`` is the reserved name).
    """

    name: str
    kind: str
    target: str


@dataclass(frozen=True)
class LevelNode:
    """One traced level: the user's function and everything resolved about it."""

    name: str
    defined_at: str
    fn: Callable[..., Any]
    module: Any
    params: tuple[torch.Tensor, ...]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Any
    inner_steps: int
    method: HypergradMethod | None
    uppers: tuple[str, ...]
    lowers: tuple[str, ...]
    arguments: tuple[Argument, ...]
    clip_grad_norm: float | None
    log_every: int = 1
    accumulate: int = 1
    precision: str = "fp32"
    warmup: int = 0
    init_from: str | None = None
    tasks: bool = False

    @property
    def reads(self) -> tuple[str, ...]:
        """Names of the levels whose handles this level's function receives."""
        return tuple(a.target for a in self.arguments if a.kind == "level")

    def describe(self) -> str:
        """One line: what the level trains, with what, on what."""
        count = sum(p.numel() for p in self.params)
        if isinstance(self.module, Mapping):
            kind = f"dict{{{', '.join(map(str, self.module))}}}"
        elif isinstance(self.module, tuple):
            kind = f"list[{len(self.module)}]"
        else:
            kind = type(self.module).__name__
        parts = [f"{kind} ({count:,} params)",
                 f"optimizer={type(self.optimizer).__name__}",
                 f"data={'none' if self.data is None else type(self.data).__name__}"]
        if self.lowers:
            parts.append(f"grad={self.method.name if self.method else '?'}")
            parts.append(f"inner_steps={self.inner_steps}")
        if self.init_from is not None:
            parts.append(f"init_from={self.init_from}" + ("  tasks" if self.tasks else ""))
        if self.scheduler is not None:
            parts.append(f"scheduler={type(self.scheduler).__name__}")
        return "  ".join(parts)


@dataclass(frozen=True)
class Edge:
    """``upper`` sits directly above ``lower``; ``method`` computes the hypergradient."""

    upper: str
    lower: str
    method: str


@dataclass(frozen=True)
class Read:
    """``reader``'s function receives ``level``'s handle (a data edge)."""

    reader: str
    level: str


@dataclass(frozen=True)
class Graph:
    """The whole traced program: levels bottom-up, hierarchy edges, data edges, options."""

    levels: tuple[LevelNode, ...]
    edges: tuple[Edge, ...]
    reads: tuple[Read, ...]
    options: Mapping[str, Any]

    def level(self, name: str) -> LevelNode:
        """The level called ``name``."""
        for node in self.levels:
            if node.name == name:
                return node
        raise KeyError(name)
