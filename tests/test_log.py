"""Loggers: TensorBoard event files, W&B offline runs, callables; names, intervals, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import mlodsl as ml
from mlodsl.errors import MissingDependencyError


def regression(log_every_fit: int = 1, log_every_hpo: int = 1, **options):
    """An MLP regressor (metric 'mse') under a learned weight decay (CG, inner_steps=2)."""
    torch.manual_seed(0)
    X, Y = torch.randn(64, 4), torch.randn(64, 2)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    log_wd = torch.nn.Parameter(torch.full((2,), -3.0))
    train = DataLoader(TensorDataset(X[:48], Y[:48]), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(0))

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), data=train,
              log_every=log_every_fit)
    def fit(batch, hpo):
        x, y = batch
        mse = (net(x) - y).pow(2).mean()
        return {"loss": mse + (hpo.exp() * net[2].weight.pow(2).sum(1)).sum(), "mse": mse}

    @ml.level(upper_of="fit", grad="cg", module=log_wd, inner_steps=2, log_every=log_every_hpo,
              optimizer=torch.optim.Adam([log_wd], lr=0.01), data=[(X[48:], Y[48:])])
    def hpo(batch, fit):
        x, y = batch
        return (fit(x) - y).pow(2).mean()

    return ml.program(fit, hpo, **{"progress": False, **options})


def expected(program, level, key, every=1):
    """(global step, value) of ``key`` at every ``every``-th step of ``level``."""
    return [(r["global_step"], r[key]) for r in program.history[level]
            if r["step"] % every == 0 and key in r]


# -- TensorBoard ---------------------------------------------------------------------------------

def test_tensorboard_scalars_read_back_with_tensorboards_reader(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = ml.log.TensorBoard(log_dir=tmp_path / "run")
    program = regression(log_every_fit=3, logger=logger)
    program.run(steps=6)
    program.run(steps=6)                       # a second run continues the same event file
    logger.on_validation(program=program, step=12, metrics={"acc": torch.tensor(0.75)})
    logger.close()

    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"fit/loss", "fit/mse", "fit/lr", "hpo/loss", "hpo/hypergrad_norm",
            "hpo/hpo->fit/residual", "hpo/hpo->fit/iterations", "val/acc"} <= tags
    assert not any(t.endswith("/step") or t.endswith("/global_step") for t in tags)

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    for tag, level, key, every in [("fit/loss", "fit", "loss", 3), ("fit/mse", "fit", "mse", 3),
                                   ("hpo/loss", "hpo", "loss", 1),
                                   ("hpo/hypergrad_norm", "hpo", "hypergrad_norm", 1)]:
        want = expected(program, level, key, every)
        got = scalars(tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag
    assert [s for s, _ in scalars("fit/loss")] == [3, 6, 9, 12]   # log_every=3, program steps
    assert [s for s, _ in scalars("hpo/loss")] == [2, 4, 6, 8, 10, 12]
    assert scalars("fit/lr") == [(3, pytest.approx(0.05))] + [(s, pytest.approx(0.05))
                                                             for s in (6, 9, 12)]
    assert scalars("val/acc") == [(12, 0.75)]
    text = events.Tensors("mlodsl/program/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "hpo -> fit  grad=cg  inner_steps=2" in text


def test_tensorboard_string_shortcut_writes_under_runs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.chdir(tmp_path)
    regression(logger="tensorboard").run(steps=2)

    files = list((tmp_path / "runs").glob("*/events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0


# -- Weights & Biases (offline) ------------------------------------------------------------------

def read_wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``).

    The file is a 7-byte header (':W&B', magic, version) and then records in 32 KiB blocks,
    each chunk prefixed by a CRC (4 bytes), a length (2, little-endian) and a type (1: full,
    2: first, 3: middle, 4: last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, payload = 7, 32 * 1024, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:                                          # block trailer: padding
            position += room
            continue
        length = int.from_bytes(data[position + 4:position + 6], "little")
        kind = data[position + 6]
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for variable, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                            "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                            "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                            "WANDB_DATA_DIR": str(tmp_path / "data"),
                            "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(variable, value)
    logger = ml.log.WandB(project="mlodsl-tests", name="offline-regression")
    program = regression(log_every_fit=2, logger=logger)
    program.run(steps=4)
    logger.on_validation(program=program, step=4, metrics={"mse": 0.5})
    logger.close()
    # W&B's service process writes the run's file; it is complete only once the service stops
    # (at exit, or here). On a loaded machine finish() alone can leave just the file's header.
    import wandb
    wandb.teardown()

    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    records = list(read_wandb_records(runs[0]))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "mlodsl-tests" and run.display_name == "offline-regression"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["levels"]["hpo"] == {"params": 2, "optimizer": "Adam", "lr": 0.01,
                                       "upper_of": ["fit"], "grad": "cg", "inner_steps": 2,
                                       "log_every": 1}
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    logged = {}
    for row in rows:
        for key, value in row.items():
            if "/" in key:
                logged.setdefault(key, []).append((row["global_step"], value))
    assert logged["fit/loss"] == [(s, pytest.approx(v)) for s, v in
                                  expected(program, "fit", "loss", 2)]
    assert [s for s, _ in logged["fit/loss"]] == [2, 4]
    assert logged["hpo/loss"] == [(s, pytest.approx(v)) for s, v in
                                  expected(program, "hpo", "loss")]
    assert [s for s, _ in logged["hpo/hpo->fit/residual"]] == [2, 4]
    assert logged["val/mse"] == [(4, 0.5)]


# -- callables, hooks, options -----------------------------------------------------------------

def test_callable_logger_gets_namespaced_floats_every_log_every_steps():
    calls = []
    program = regression(log_every_fit=2, log_every_hpo=3,
                         logger=lambda metrics, step: calls.append((step, metrics)))
    program.run(steps=12)

    fit_steps = [step for step, m in calls if "fit/loss" in m]
    hpo_steps = [step for step, m in calls if "hpo/loss" in m]
    assert fit_steps == [2, 4, 6, 8, 10, 12] and hpo_steps == [6, 12]
    step, metrics = next((s, m) for s, m in calls if "hpo/loss" in m)
    assert set(metrics) == {"hpo/loss", "hpo/lr", "hpo/hypergrad_norm",
                            "hpo/hpo->fit/residual", "hpo/hpo->fit/iterations"}
    assert all(type(v) is float for v in metrics.values())
    assert metrics["hpo/loss"] == pytest.approx(program.history["hpo"][2]["loss"])
    assert len(program.history["fit"]) == 12  # the history keeps every step


def test_validation_metrics_are_logged_under_val():
    calls = []
    logger = ml.log.Callback(lambda metrics, step: calls.append((step, metrics)))
    logger.on_validation(program=None, step=7, metrics={
        "acc": torch.tensor(0.5), "loss": 1.25, "per_level": {"hpo": 2}, "name": "skipped"})
    assert calls == [(7, {"val/acc": 0.5, "val/loss": 1.25, "val/per_level/hpo": 2.0})]


def test_logger_option_takes_hook_objects_and_lists():
    class Recorder:
        def __init__(self):
            self.levels = []

        def on_step_end(self, *, program, level, step, metrics):
            self.levels.append(level)

    hook, calls = Recorder(), []
    program = regression(logger=[hook, lambda metrics, step: calls.append(step)])
    program.run(steps=2)
    assert hook.levels == ["fit", "fit", "hpo"] and calls == [1, 2, 2]


def test_bad_logger_values_fail_when_the_program_is_traced(monkeypatch):
    with pytest.raises(ValueError, match=r"logger='tensorbord'.*Did you mean 'tensorboard'\?"):
        regression(logger="tensorbord")
    with pytest.raises(TypeError, match=r"logger of type int; pass 'tensorboard', 'wandb'"):
        regression(logger=42)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingDependencyError,
                       match=r"logger='tensorboard' needs the tensorboard package.*"
                             r"pip install 'mlodsl\[log\]'"):
        regression(logger="tensorboard")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'mlodsl\[log\]'"):
        ml.log.WandB(project="p")


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_log_every_must_be_a_positive_integer(value):
    with pytest.raises(ml.errors.InvalidLevelError,
                       match=r"level 'fit' \(.*test_log.py:\d+\): log_every must be a positive"):
        regression(log_every_fit=value)


def test_validation_callback_metrics_reach_the_logger():
    calls = []

    def validation(fit):
        x = torch.ones(4, 4)
        return {"out": fit(x).mean()}

    program = regression(logger=lambda metrics, step: calls.append((step, metrics)),
                         validation=validation, validate_every=3)
    program.run(steps=6)
    logged = [(step, m["val/out"]) for step, m in calls if "val/out" in m]
    assert [step for step, _ in logged] == [3, 6]
    assert [value for _, value in logged] == pytest.approx(
        [r["out"] for r in program.history.validation])
    assert all(set(m) == {"val/out"} for _, m in calls if "val/out" in m)
