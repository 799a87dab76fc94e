"""Exact save/resume across processes, periodic checkpoints, SIGKILL, bad files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mlodsl as ml
from mlodsl import checkpoint
from programs import resumable

SCRIPT = Path(resumable.__file__)
N = 12


def run_script(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[2])}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def assert_bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[torch.Tensor]:
    out = tmp_path_factory.mktemp("straight") / "params.pt"
    done = run_script("straight", N, out)
    assert done.returncode == 0, done.stderr
    return torch.load(out)


def test_resume_in_a_fresh_process_is_bitwise_identical(straight, tmp_path):
    ckpt, out = tmp_path / "half.pt", tmp_path / "params.pt"
    first = run_script("save", N // 2, ckpt)
    assert first.returncode == 0, first.stderr
    second = run_script("resume", ckpt, N - N // 2, out)
    assert second.returncode == 0, second.stderr
    assert_bitwise_equal(straight, torch.load(out))


def test_resume_after_sigkill_right_after_a_periodic_checkpoint(straight, tmp_path):
    folder = tmp_path / "ckpts"
    killed = run_script("periodic", N, folder, 6)
    assert killed.returncode == -9  # SIGKILL: no clean-up ran
    assert checkpoint.latest(folder).name == "step-000000006.pt"
    assert not list(folder.glob(".*.tmp"))  # no half-written file left behind
    out = tmp_path / "params.pt"
    resumed = run_script("resume", folder, N - 6, out)
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(straight, torch.load(out))


def test_save_and_load_in_process_restores_everything(tmp_path):
    program, _ = resumable.build()
    program.run(steps=5)
    program.save(tmp_path / "five.pt")
    program.run(steps=5)
    _, levels = resumable.build()
    again = ml.load(tmp_path / "five.pt", *levels, seed=1, progress=False)
    assert again.steps == {"program": 5, "fit": 5, "hpo": 2}
    assert len(again.history["fit"]) == 5
    assert again._runtime.edges[("hpo", "fit")].state["cg_solution"] is not None
    again.run(steps=5)
    assert_bitwise_equal(resumable.parameters(program), resumable.parameters(again))
    assert again.history.series("fit", "loss") == program.history.series("fit", "loss")


def test_periodic_checkpoints_keep_the_last_k(tmp_path):
    program, _ = resumable.build(checkpoint_dir=tmp_path, checkpoint_every=2,
                                 keep_checkpoints=2)
    program.run(steps=9)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step-000000006.pt",
                                                             "step-000000008.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    program, _ = resumable.build()
    program.run(steps=2)
    path = program.save(tmp_path / "ok.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ml.CheckpointError, match=r"cannot read checkpoint .*cut\.pt.*truncated"):
        program.load(tmp_path / "cut.pt")


class _Payload:
    """Unpickling this would create a marker file: a checkpoint must never run it."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tampered_checkpoint_cannot_run_code(tmp_path):
    program, _ = resumable.build()
    state = checkpoint.capture(program._runtime)
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    state["history"] = _Payload()
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(ml.CheckpointError, match="weights_only=True and never runs code"):
        program.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_checkpoint_from_another_program_is_refused(tmp_path):
    program, _ = resumable.build()
    path = program.save(tmp_path / "a.pt")
    w = torch.nn.Parameter(torch.zeros(2))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def other():
        return w.pow(2).sum()

    with pytest.raises(ml.CheckpointError, match=r"holds levels \['fit', 'hpo'\].*\['other'\]"):
        ml.load(path, other)
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(ml.CheckpointError, match="not an mlodsl checkpoint"):
        program.load(tmp_path / "plain.pt")
    with pytest.raises(ml.CheckpointError, match="does not exist"):
        program.load(tmp_path / "missing.pt")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    program, _ = resumable.build()

    def broken_save(obj, handle, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        program.save(tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []
