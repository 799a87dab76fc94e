"""Compile a traced program into a loop schedule. Pure Python: no torch calls here.

Time is counted in *program steps*: one step of the lowest level(s). A level with no lower
level steps every program step; a level with lowers steps every ``inner_steps * lcm(periods of
its lowers)`` program steps, so that each level below it has taken at least ``inner_steps``
steps since its previous update. Within one program step, due levels step bottom-up, so an upper
level always sees its lowers' latest parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    """One level's update in the schedule.

    Attributes:
        level: The level that steps.
        every: It steps at program steps that are multiples of this.
        method: Name of the hypergradient method on its edges, ``None`` for a lowest level.
        below: Every level below it, deepest first: the hypergradient walks these.
    """

    level: str
    every: int
    method: str | None
    below: tuple[str, ...]


@dataclass(frozen=True)
class Schedule:
    """The compiled loop: actions in the order they run within a program step."""

    actions: tuple[Action, ...]

    @property
    def cycle(self) -> int:
        """Program steps after which the pattern of updates repeats."""
        return math.lcm(*(a.every for a in self.actions)) if self.actions else 1

    def at(self, step: int) -> tuple[Action, ...]:
        """The actions due at program step ``step`` (1-based), in order."""
        return tuple(a for a in self.actions if step % a.every == 0)

    def expand(self, steps: int) -> list[tuple[int, tuple[str, ...]]]:
        """``(program step, levels that step)`` for the first ``steps`` program steps."""
        return [(s, tuple(a.level for a in self.at(s))) for s in range(1, steps + 1)]

    def __str__(self) -> str:
        lines = [f"schedule (repeats every {self.cycle} program step"
                 f"{'s' if self.cycle != 1 else ''}):"]
        width = max((len(a.level) for a in self.actions), default=0)
        for a in self.actions:
            when = "every step" if a.every == 1 else f"every {a.every} steps"
            line = f"  {when:<16} {a.level:<{width}}  step"
            if a.below:
                line += f"  <- hypergradient ({a.method}) through {', '.join(reversed(a.below))}"
            lines.append(line)
        return "\n".join(lines)


def compile_schedule(order: Sequence[str], lowers: Mapping[str, Sequence[str]],
                     inner_steps: Mapping[str, int], methods: Mapping[str, str | None]
                     ) -> Schedule:
    """Build the schedule.

    Args:
        order: Level names, each after all of its lowers (bottom-up).
        lowers: Each level's direct lowers.
        inner_steps: Each level's ``inner_steps``.
        methods: Each level's method name (``None`` for levels with no lowers).
    """
    every: dict[str, int] = {}
    below: dict[str, set[str]] = {}
    for name in order:
        below[name] = set()
        if not lowers[name]:
            every[name] = 1
            continue
        every[name] = inner_steps[name] * math.lcm(*(every[lower] for lower in lowers[name]))
        for lower in lowers[name]:
            below[name] |= {lower} | below[lower]
    rank = {name: i for i, name in enumerate(order)}
    return Schedule(tuple(
        Action(level=name, every=every[name], method=methods[name] if lowers[name] else None,
               below=tuple(sorted(below[name], key=rank.__getitem__)))
        for name in order
    ))
