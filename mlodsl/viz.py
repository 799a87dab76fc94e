"""Text rendering of a program's level graph."""

from __future__ import annotations

from typing import Any


class GraphText(str):
    """A text drawing that shows as itself (not as a quoted string) in a notebook or REPL."""

    def __repr__(self) -> str:
        return str(self)


def render_text(program: Any) -> GraphText:
    """Each top level with the levels below it indented, edges labelled with their method."""
    lines: list[str] = []
    steps = program.steps if program._interpreter is not None else None

    def label(name: str) -> str:
        text = name
        if steps is not None:
            last = program.history.last(name)
            text += f" [{steps[name]} steps"
            text += f", loss {last['loss']:.4g}]" if last else "]"
        return text

    def walk(name: str, depth: int, via: str) -> None:
        lines.append("  " * depth + via + label(name))
        node = program.level(name)
        for lower in node.lowers:
            walk(lower, depth + 1, f"--{node.method.name}, inner_steps={node.inner_steps}--> ")

    for node in reversed(program.levels):
        if not node.uppers:
            walk(node.name, 0, "")
    return GraphText("\n".join(lines))
