"""The level graph as text: the indented text drawing, Graphviz's DOT and a Mermaid flowchart,
each built from the same label pieces of a :func:`mlodsl.viz.snapshot`."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlodsl.viz import EdgeView, NodeView

_MERMAID_KEYWORDS = {"end", "graph", "subgraph", "flowchart", "style", "class", "classdef",
                     "click", "linkstyle", "default", "direction"}


def _fmt(value: float) -> str:
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and \
            abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


# -- the pieces of each label, shared by every rendering ---------------------------------------

def _about(node: NodeView) -> list[str]:
    return [f"{node.module} ({node.params:,} params)", f"{node.optimizer}, data={node.data}"]


def _live(node: NodeView, detail: str) -> list[str]:
    if node.steps is None:
        return []
    parts = [f"{node.steps} steps"]
    if node.loss is not None:
        parts.append(f"loss {node.loss:.4g}")
    if detail == "full" and node.hypergrad_norm is not None:
        parts.append(f"|hypergrad| {node.hypergrad_norm:.3g}")
    return parts


def _edge_label(edge: EdgeView, detail: str) -> list[str]:
    lines = [f"{edge.method}, inner_steps={edge.inner_steps}"]
    if detail == "full" and edge.figures:
        lines.append(", ".join(f"{k} {_fmt(v)}" for k, v in edge.figures.items()))
    return lines


# -- renderings ---------------------------------------------------------------------------------

def text_drawing(nodes: Sequence[NodeView], edges: Sequence[EdgeView], detail: str) -> str:
    """Each top level with the levels below it indented, edges labelled with their method.

    A level below several uppers is drawn in full under the first and named again under the
    others.
    """
    by_name = {n.name: n for n in nodes}
    lowers: dict[str, list[EdgeView]] = {n.name: [] for n in nodes}
    for edge in edges:
        lowers[edge.upper].append(edge)
    has_upper = {e.lower for e in edges}
    lines: list[str] = []
    drawn: set[str] = set()

    def label(name: str) -> str:
        node = by_name[name]
        text = name
        live = _live(node, detail)
        if live:
            text += f" [{', '.join(live)}]"
        if detail == "full":
            text += "  " + ", ".join(_about(node))
        return text

    def walk(name: str, depth: int, via: str) -> None:
        if name in drawn:
            lines.append("  " * depth + via + f"{name} (drawn above)")
            return
        drawn.add(name)
        lines.append("  " * depth + via + label(name))
        for edge in lowers[name]:
            walk(edge.lower, depth + 1, f"--{'; '.join(_edge_label(edge, detail))}--> ")

    for node in nodes:
        if node.name not in has_upper:
            walk(node.name, 0, "")
    return "\n".join(lines)


def _html(text: str) -> str:
    return html.escape(text, quote=True)


def dot_source(nodes: Sequence[NodeView], edges: Sequence[EdgeView], direction: str,
               detail: str) -> str:
    """The graph in Graphviz's DOT language (HTML-like labels)."""
    lines = [
        "digraph mlodsl {",
        f"  graph [rankdir={direction}, bgcolor=white, pad=0.2, nodesep=0.5, ranksep=0.6];",
        '  node [shape=box, style="rounded,filled", fillcolor="#eef4fb", color="#4a6fa5", '
        'fontname="Helvetica", fontsize=11, margin="0.2,0.1"];',
        '  edge [color="#4a6fa5", fontname="Helvetica", fontsize=10];',
    ]
    for node in nodes:
        rows = _node_rows(node, detail, _html, live_style='<font color="#1f5fa8">{}</font>')
        lines.append(f'  "{node.name}" [label=<{"<br/>".join(rows)}>];')
    for edge in edges:
        label = "<br/>".join(_html(line) for line in _edge_label(edge, detail))
        lines.append(f'  "{edge.upper}" -> "{edge.lower}" [label=<{label}>];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node_rows(node: NodeView, detail: str, escape: Callable[[str], str],
               live_style: str = "{}") -> list[str]:
    """A node's label lines (name, description, live figures), escaped for one format."""
    rows = [f"<b>{escape(node.name)}</b>"]
    if detail == "full":
        rows += [escape(line) for line in _about(node)]
    live = _live(node, detail)
    if live:
        rows.append(live_style.format(escape(", ".join(live))))
    return rows


def _mermaid_id(name: str) -> str:
    return f"{name}_" if name.lower() in _MERMAID_KEYWORDS else name


def _mermaid_text(text: str) -> str:
    return html.escape(text, quote=False).replace('"', "#quot;")


def mermaid_source(nodes: Sequence[NodeView], edges: Sequence[EdgeView], direction: str,
                   detail: str) -> str:
    """The graph as a Mermaid flowchart (paste into Markdown inside a ```mermaid block)."""
    lines = [f"flowchart {direction}"]
    for node in nodes:
        rows = _node_rows(node, detail, _mermaid_text)
        lines.append(f'    {_mermaid_id(node.name)}["{"<br/>".join(rows)}"]')
    for edge in edges:
        label = "<br/>".join(_mermaid_text(line) for line in _edge_label(edge, detail))
        lines.append(f'    {_mermaid_id(edge.upper)} -->|"{label}"| {_mermaid_id(edge.lower)}')
    return "\n".join(lines) + "\n"
