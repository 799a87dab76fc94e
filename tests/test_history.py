"""History as a tidy table (rows, pandas) and as a plot of each level's losses."""

from __future__ import annotations

import sys

import pytest
import torch

import mlodsl as ml
from mlodsl.errors import MissingDependencyError
from test_log import regression


@pytest.fixture(scope="module")
def ran():
    program = regression()
    program.run(steps=6)
    return program


def test_rows_are_one_tidy_table_in_the_order_steps_ran(ran):
    rows = ran.history.rows()

    assert [(r["level"], r["step"], r["global_step"]) for r in rows] == [
        ("fit", 1, 1), ("fit", 2, 2), ("hpo", 1, 2), ("fit", 3, 3), ("fit", 4, 4), ("hpo", 2, 4),
        ("fit", 5, 5), ("fit", 6, 6), ("hpo", 3, 6)]
    assert list(rows[0])[:3] == ["level", "step", "global_step"]
    assert set(rows[0]) == {"level", "step", "global_step", "loss", "mse"}
    assert {"loss", "hypergrad_norm", "hpo->fit/residual"} <= set(rows[2])
    assert rows[2]["loss"] == ran.history["hpo"][0]["loss"] and type(rows[2]["loss"]) is float
    assert [r["step"] for r in ran.history.rows(levels=["hpo"])] == [1, 2, 3]
    with pytest.raises(KeyError, match=r"no level 'hp' in this history; levels: fit, hpo"):
        ran.history.rows(levels=["hp"])


def test_to_pandas(ran):
    pandas = pytest.importorskip("pandas")
    frame = ran.history.to_pandas()

    assert isinstance(frame, pandas.DataFrame) and len(frame) == 9
    assert list(frame.columns[:4]) == ["level", "step", "global_step", "loss"]
    assert frame.groupby("level").size().to_dict() == {"fit": 6, "hpo": 3}
    hpo = frame[frame.level == "hpo"]
    assert hpo.hypergrad_norm.notna().all()
    assert frame[frame.level == "fit"].hypergrad_norm.isna().all()
    assert hpo.loss.tolist() == ran.history.series("hpo", "loss")


def test_to_pandas_without_pandas_says_how_to_install_it(ran, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingDependencyError, match=r"pip install pandas.*history.rows\(\)"):
        ran.history.to_pandas()


def test_plot_draws_each_levels_loss_against_the_program_step(ran):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = ran.history.plot()
    try:
        top, bottom = figure.axes
        assert top.get_ylabel() == "hpo\nloss" and bottom.get_ylabel() == "fit\nloss"
        assert bottom.get_xlabel() == "program step"
        (line,) = top.get_lines()
        assert list(line.get_xdata()) == [2, 4, 6]
        assert list(line.get_ydata()) == pytest.approx(ran.history.series("hpo", "loss"))
    finally:
        plt.close(figure)

    smoothed = ran.history.plot("mse", smooth=0.5, logy=True)
    try:
        (axis,) = smoothed.axes  # only 'fit' records 'mse'
        raw, average = axis.get_lines()
        y = ran.history.series("fit", "mse")
        assert average.get_ydata()[1] == pytest.approx(0.5 * y[0] + 0.5 * y[1])
        assert axis.get_yscale() == "log"
    finally:
        plt.close(smoothed)
    with pytest.raises(ValueError, match=r"no level has recorded 'acc' yet"):
        ran.history.plot("acc")
    with pytest.raises(ValueError, match=r"smooth=1.0"):
        ran.history.plot(smooth=1.0)


def test_plot_without_matplotlib_says_how_to_install_it(ran, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'mlodsl\[viz\]'"):
        ran.history.plot()


def test_rows_before_a_run_are_empty():
    w = torch.nn.Parameter(torch.zeros(2))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def only():
        return w.pow(2).sum()

    assert ml.program(only).history.rows() == []
