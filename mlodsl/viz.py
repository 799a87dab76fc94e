"""Drawing a program's level graph: graphviz (SVG/PNG), Mermaid, and plain text.

:meth:`Program.visualize` returns a :class:`LevelGraph`, a snapshot of the program taken when
it was called: one node per level (name, what it trains, its optimizer and data; after a run,
its step count, last loss and last hypergradient norm) and one edge per ``upper_of`` relation
(hypergradient method and ``inner_steps``; after a run, the solver's last residual). The
snapshot renders inline in Jupyter, saves as SVG/PNG/PDF/DOT/Mermaid/text, and falls back to a
text drawing (the one ``print(program)`` shows) where graphviz is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlodsl.errors import MissingDependencyError
from mlodsl.viz_formats import dot_source, mermaid_source, text_drawing

DIRECTIONS = ("TB", "LR", "BT", "RL")
DETAILS = ("full", "compact")

_PIP = "pip install 'mlodsl[viz]'"
_DOT_INSTALL = ("apt-get install graphviz (Debian/Ubuntu), brew install graphviz (macOS) or "
                "conda install -c conda-forge graphviz")
_NO_GRAPHVIZ_PACKAGE = (
    "drawing the level graph needs the graphviz Python package, which is not installed. "
    f"Install it with: {_PIP} (it also needs Graphviz's 'dot' program: {_DOT_INSTALL}). "
    "Until then print(graph) shows the text drawing, and graph.source / graph.mermaid() give "
    "the DOT and Mermaid text."
)
_NO_DOT = (
    "drawing the level graph needs Graphviz's 'dot' program, which is not on the PATH. "
    f"Install it with: {_DOT_INSTALL}. Until then print(graph) shows the text drawing, and "
    "graph.source / graph.mermaid() give the DOT and Mermaid text."
)
# Solver figures shown on an edge, in this order, when the upper level's last record has them.
_EDGE_FIGURES = ("residual", "iterations")
# Formats save() writes from the DOT source with graphviz, and the ones it writes as text.
_BINARY = ("svg", "png", "pdf")
_TEXT = {"dot": "source", "gv": "source", "mmd": "mermaid", "txt": "text"}


@dataclass(frozen=True)
class NodeView:
    """One level as drawn.

    Attributes:
        name: The level's name.
        module: What it trains (``"Sequential"``, ``"dict{pixels, output}"``, ...).
        params: Number of trainable scalars.
        optimizer: The optimizer's class name.
        data: The data's type name (``"none"`` without data).
        steps: Steps taken so far; ``None`` before the program first ran.
        loss: Last loss, if the level has stepped.
        hypergrad_norm: Norm of the last hypergradient (upper levels that have stepped).
    """

    name: str
    module: str
    params: int
    optimizer: str
    data: str
    steps: int | None = None
    loss: float | None = None
    hypergrad_norm: float | None = None


@dataclass(frozen=True)
class EdgeView:
    """One ``upper_of`` edge as drawn; ``figures`` holds the solver's last residual etc."""

    upper: str
    lower: str
    method: str
    inner_steps: int
    figures: Mapping[str, float] = field(default_factory=dict)


def _module_kind(module: Any) -> str:
    if isinstance(module, Mapping):
        return f"dict{{{', '.join(map(str, module))}}}"
    if isinstance(module, tuple):
        return f"list[{len(module)}]"
    return type(module).__name__


def _data_kind(data: Any) -> str:
    return "none" if data is None else type(data).__name__


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if not isinstance(value, bool) else None


def snapshot(program: Any) -> tuple[tuple[NodeView, ...], tuple[EdgeView, ...]]:
    """The program's levels (top-down) and edges, with live figures if it has run.

    Args:
        program: A :class:`~mlodsl.program.Program`.

    Returns:
        ``(nodes, edges)``.
    """
    # Reading program.steps would create the runtime (seeding, moving modules); only read live
    # figures once the program has actually been run.
    ran = getattr(program, "_interpreter", None) is not None
    steps = program.steps if ran else {}
    last = {n.name: program.history.last(n.name) for n in program.levels} if ran else {}
    nodes = []
    for node in reversed(program.levels):
        record = last.get(node.name, {})
        nodes.append(NodeView(
            name=node.name, module=_module_kind(node.module),
            params=sum(p.numel() for p in node.params),
            optimizer=type(node.optimizer).__name__, data=_data_kind(node.data),
            steps=steps.get(node.name), loss=_number(record.get("loss")),
            hypergrad_norm=_number(record.get("hypergrad_norm")),
        ))
    edges = []
    for edge in program.edges:
        record = last.get(edge.upper, {})
        figures: dict[str, float] = {}
        for key, value in record.items():
            # "upper->lower/figure", or "upper->a,b/figure" for a joint solve over lowers a, b.
            head, _, figure = str(key).rpartition("/")
            upper, _, lowers = head.partition("->")
            if upper == edge.upper and edge.lower in lowers.split(",") and \
                    figure in _EDGE_FIGURES and _number(value) is not None:
                figures[figure] = _number(value)
        ordered = {k: figures[k] for k in _EDGE_FIGURES if k in figures}
        edges.append(EdgeView(upper=edge.upper, lower=edge.lower, method=edge.method,
                              inner_steps=program.level(edge.upper).inner_steps,
                              figures=ordered))
    return tuple(nodes), tuple(edges)


def render(source: str, fmt: str) -> bytes:
    """Lay out DOT ``source`` with Graphviz's ``dot`` and return the ``fmt`` output.

    Raises:
        MissingDependencyError: the graphviz package or the ``dot`` program is missing; the
            message says how to install it.
    """
    try:
        import graphviz
    except ImportError as error:
        raise MissingDependencyError(_NO_GRAPHVIZ_PACKAGE) from error
    try:
        return graphviz.Source(source).pipe(format=fmt)
    except graphviz.ExecutableNotFound as error:
        raise MissingDependencyError(_NO_DOT) from error


class LevelGraph:
    """A drawing of a program's level graph, as it was when :meth:`Program.visualize` ran.

    Renders inline in Jupyter (SVG laid out by Graphviz, or the text drawing plus install
    instructions where Graphviz is missing); ``print(graph)`` shows the text drawing.

    Attributes:
        nodes: The levels, top-down.
        edges: The ``upper_of`` edges.
        direction: Graphviz/Mermaid layout direction: ``"TB"`` (top level on top), ``"LR"``,
            ``"BT"`` or ``"RL"``.
        detail: ``"full"`` (modules, optimizers, data, hypergradient norms, solver residuals)
            or ``"compact"`` (names, methods, step counts and losses).

    Example:
        >>> graph = program.visualize(direction="LR")
        >>> graph.save("program.svg")
        >>> print(graph.mermaid())
    """

    def __init__(self, program: Any, *, direction: str = "TB", detail: str = "full") -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"visualize(direction={direction!r}): use one of "
                             f"{', '.join(map(repr, DIRECTIONS))}")
        if detail not in DETAILS:
            raise ValueError(f"visualize(detail={detail!r}): use one of "
                             f"{', '.join(map(repr, DETAILS))}")
        self.nodes, self.edges = snapshot(program)
        self.direction = direction
        self.detail = detail
        self._rendered: dict[str, bytes] = {}

    @property
    def text(self) -> str:
        """The plain-text drawing (what ``print(graph)`` shows)."""
        return text_drawing(self.nodes, self.edges, self.detail)

    @property
    def source(self) -> str:
        """The DOT source Graphviz lays out."""
        return dot_source(self.nodes, self.edges, self.direction, self.detail)

    def mermaid(self) -> str:
        """The graph as Mermaid flowchart text, for Markdown docs (```mermaid blocks)."""
        return mermaid_source(self.nodes, self.edges, self.direction, self.detail)

    def pipe(self, fmt: str = "svg") -> bytes:
        """The drawing laid out by Graphviz in ``fmt`` (``"svg"``, ``"png"``, ``"pdf"``, ...).

        Raises:
            MissingDependencyError: graphviz (the package or ``dot``) is missing.
        """
        if fmt not in self._rendered:
            self._rendered[fmt] = render(self.source, fmt)
        return self._rendered[fmt]

    def svg(self) -> str:
        """The drawing as SVG text.

        Raises:
            MissingDependencyError: graphviz (the package or ``dot``) is missing.
        """
        return self.pipe("svg").decode("utf-8")

    def save(self, path: str | Path, format: str | None = None) -> Path:
        """Write the drawing to ``path``.

        Args:
            path: Where to write.
            format: ``"svg"``, ``"png"``, ``"pdf"`` (laid out by Graphviz), ``"dot"``/``"gv"``
                (DOT source), ``"mmd"`` (Mermaid) or ``"txt"`` (text drawing). Defaults to the
                path's suffix.

        Returns:
            The path written.

        Raises:
            ValueError: the format is unknown.
            MissingDependencyError: an SVG/PNG/PDF was asked for and graphviz is missing.
        """
        path = Path(path)
        fmt = (format or path.suffix.lstrip(".")).lower()
        if fmt in _TEXT:
            content = getattr(self, _TEXT[fmt])
            content = content() if callable(content) else content
            path.write_text(content if content.endswith("\n") else content + "\n")
        elif fmt in _BINARY:
            path.write_bytes(self.pipe(fmt))
        else:
            known = ", ".join([*_BINARY, *_TEXT])
            raise ValueError(f"cannot save the level graph as {fmt!r} ({path}); use one of "
                             f"{known}, by suffix or format=...")
        return path

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        try:
            return {"image/svg+xml": self.svg(), "text/plain": self.text}
        except MissingDependencyError as error:
            return {"text/plain": f"{self.text}\n\n({error})"}

    def _repr_svg_(self) -> str | None:
        try:
            return self.svg()
        except MissingDependencyError:
            return None

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text


def render_text(program: Any, detail: str = "compact") -> str:
    """The text drawing of ``program``'s level graph (used by ``print(program)``)."""
    nodes, edges = snapshot(program)
    return text_drawing(nodes, edges, detail)
