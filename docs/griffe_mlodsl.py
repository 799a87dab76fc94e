"""Griffe extension used by the docs build: read mlodsl's docstrings as written.

The docstrings follow Google style with two habits griffe's Google parser does not know:

* ``Example:`` (singular) introduces doctest-style examples; griffe only treats ``Examples:``
  as an examples section and would render ``Example:`` as an admonition whose ``>>>`` lines
  become nested block quotes.
* Sphinx roles (``:class:`Program```, ``:meth:`save```) name other objects; in Markdown they
  would show up verbatim. They become code spans (not links: a link to an object that no API
  page renders would be a broken cross-reference).

The source files stay as they are; this only changes what the site shows.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):`~?([^`]+)`")


def to_markdown(text: str) -> str:
    """The docstring ``text`` with ``Example:`` headings and Sphinx roles rewritten."""
    text = _EXAMPLE_HEADING.sub(r"\1Examples:", text)
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", text)


class MlodslDocstrings(griffe.Extension):
    """Rewrite each object's docstring before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
