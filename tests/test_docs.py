"""The documentation site builds with warnings as errors (what CI checks).

``mkdocs build --strict`` fails on a link to a missing page or anchor, a page that cannot be
rendered, and griffe's docstring warnings in the API reference (a documented parameter that
the signature lacks, ...). The build runs in a subprocess with this interpreter, from the
repository root, into a temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build(site: Path, config: Path = ROOT / "mkdocs.yml") -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}   # Material's notice about MkDocs 2.0
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_docs_build_strict(tmp_path):
    result = build(tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    # The API reference was generated from the docstrings, not left as ':::' directives.
    api = (tmp_path / "site" / "api" / "program" / "index.html").read_text()
    assert "Declare a level of a multilevel program" in api
    assert ":::" not in api
    assert (tmp_path / "site" / "benchmarks" / "index.html").exists()


@pytest.fixture
def broken_docs(tmp_path):
    """A copy of the site's config and pages with one link to a page that does not exist."""
    docs = tmp_path / "docs"
    for source in (ROOT / "docs").rglob("*"):
        if source.is_file():
            target = docs / source.relative_to(ROOT / "docs")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    page = docs / "concepts.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    config = (ROOT / "mkdocs.yml").read_text()
    config = config.replace("docs_dir: docs", f"docs_dir: {docs}")
    config = config.replace("paths: [.]", f"paths: [{ROOT}]")
    (tmp_path / "mkdocs.yml").write_text(config)
    return tmp_path / "mkdocs.yml"


def test_a_broken_link_fails_the_build(tmp_path, broken_docs):
    result = build(tmp_path / "site", broken_docs)
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr
