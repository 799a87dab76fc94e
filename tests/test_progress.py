"""The progress bar: what it shows, when it is on, and which bar it picks in a notebook."""

from __future__ import annotations

import io
import sys
import types

import pytest

from mlodsl.hooks import ProgressBar, _tqdm, in_notebook, wants_progress
from test_log import regression


def test_bar_shows_program_steps_lowest_level_step_and_latest_losses():
    out = io.StringIO()
    program = regression(hooks=[ProgressBar(file=out, refresh_s=0.0)])
    program.run(steps=30)

    final = out.getvalue().split("\r")[-1]
    assert "30/30" in final and "fit step 30" in final
    fit, hpo = (program.history.last(n)["loss"] for n in ("fit", "hpo"))
    assert f"loss fit {fit:.3g}, hpo {hpo:.3g}" in final

    out.truncate(0)
    program.run(steps=10)  # a second run: a new bar of 10 steps, the level's step continues
    final = out.getvalue().split("\r")[-1]
    assert "10/10" in final and "fit step 40" in final


def test_bar_closes_when_a_run_fails():
    out = io.StringIO()
    bar = ProgressBar(file=out)

    class Boom:
        def on_step_end(self, *, program, level, step, metrics):
            if step == 3:
                raise RuntimeError("boom")

    program = regression(hooks=[bar, Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        program.run(steps=10)
    assert bar._bar is None and "3/10" in out.getvalue().split("\r")[-1]


def test_progress_option(capsys):
    regression(progress=True).run(steps=3)
    assert "3/3" in capsys.readouterr().err
    regression(progress=False).run(steps=3)
    assert capsys.readouterr().err == ""
    regression(progress=None).run(steps=120)  # default; pytest's stderr is not a terminal
    assert capsys.readouterr().err == ""


def test_wants_progress_on_long_runs_in_a_terminal_or_notebook_only(monkeypatch):
    assert wants_progress(True, 1) and not wants_progress(False, 10_000)
    assert not wants_progress(None, 10_000)              # not a terminal, not a notebook
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: True))
    assert wants_progress(None, 100) and not wants_progress(None, 99)
    monkeypatch.setattr(sys, "stderr", None)             # pythonw: no stderr at all
    assert not wants_progress(None, 10_000)


def fake_kernel(monkeypatch):
    class ZMQInteractiveShell:
        pass

    shell = ZMQInteractiveShell()
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell",
                        types.SimpleNamespace(ZMQInteractiveShell=ZMQInteractiveShell))
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))


def test_notebook_gets_a_bar_and_a_widget_only_with_ipywidgets(monkeypatch):
    from tqdm.notebook import tqdm as notebook_tqdm
    from tqdm.std import tqdm as text_tqdm

    assert not in_notebook() and _tqdm(None) is text_tqdm
    fake_kernel(monkeypatch)
    assert in_notebook() and wants_progress(None, 100)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)        # not installed
    assert _tqdm(None) is text_tqdm
    monkeypatch.setitem(sys.modules, "ipywidgets", types.ModuleType("ipywidgets"))
    assert _tqdm(None) is notebook_tqdm
    assert _tqdm(io.StringIO()) is text_tqdm                    # a file means text
