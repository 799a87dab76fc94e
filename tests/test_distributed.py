"""Distributed data parallel: 2 processes (gloo, CPU) launched with torchrun equal one process.

Two launches of ``tests/programs/ddp_bilevel.py``: one runs every exactness, checkpoint and
error case on the same two ranks; the other resumes its checkpoint in fresh processes, then
makes rank 1 fail (raise, then hang). The single-process
references run here, in the test process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mlodsl as ml
from programs import ddp_bilevel

SCRIPT = Path(ddp_bilevel.__file__)
TOLERANCE = 1e-12  # float64; the ranks sum in another order than one process


def launch(mode: str, out: Path, *extra: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SCRIPT.parents[2]}{os.pathsep}{SCRIPT.parents[1]}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPT), mode, str(out), *map(str, extra)],
        env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    done = launch("cases", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {**torch.load(out / "cases.pt"), "folder": out}


def reference(name: str, steps: int = ddp_bilevel.STEPS) -> dict[str, list[torch.Tensor]]:
    """One process, the same global batch. A shuffling loader's order under data parallelism
    is DistributedSampler's (seed + epoch), which distributed='ddp' in one process also uses;
    a non-shuffling one is the plain program's."""
    method, shuffle, more = ddp_bilevel.CASES[name]
    program = ddp_bilevel.build(method(), "ddp" if shuffle else False, shuffle, **more)
    program.run(steps=steps)
    return ddp_bilevel.final(program)


def assert_close(got: dict, want: dict, tolerance: float = TOLERANCE) -> None:
    assert got.keys() == want.keys() == {"low", "up"}
    for level in want:
        for a, b in zip(got[level], want[level]):
            assert (a - b).abs().max() <= tolerance * max(1.0, b.abs().max()), level


@pytest.mark.parametrize("name", list(ddp_bilevel.CASES))
def test_two_ranks_equal_one_process_with_the_same_global_batch(cases, name):
    want = reference(name)
    assert_close(cases[name], want)
    moved = want["up"][0] - torch.full((5,), -2.0, dtype=torch.float64)
    assert moved.abs().max() > 1e-3  # the upper level did learn: the comparison means something


def test_maml_over_tasks_split_between_ranks(cases):
    # tasks=True: each rank adapts its 12 of the 24 tasks; float32, so rounding-level agreement.
    want = ddp_bilevel.maml("ddp")
    for a, b in zip(cases["maml"], want):
        assert (a - b).abs().max() <= 1e-5
    assert any((a - b).abs().max() > 0 for a, b in zip(want, ddp_bilevel.maml("ddp", 0)))


def test_rank_0_validates_and_logs_and_every_rank_stops_together(cases):
    (calls0, rows0, steps0, val0), (calls1, rows1, steps1, val1) = cases["rank0"]
    assert calls0 > 0 and rows0 > 0 and calls1 == rows1 == 0
    assert val0 == val1 and all(v["acc"] == 1.0 for v in val0)  # rank 0's figures everywhere
    # acc never improves, patience 1: both ranks stop at the same program step, before the end.
    assert steps0 == steps1 and steps0["program"] < ddp_bilevel.STEPS


def test_history_holds_the_global_batch_loss(cases):
    method, shuffle, _ = ddp_bilevel.CASES["cg"]
    program = ddp_bilevel.build(method(), False, shuffle)
    program.run(steps=ddp_bilevel.STEPS)
    want = [float(r["loss"]) for r in program.history["low"]]
    assert cases["cg_history"] == pytest.approx(want, rel=1e-12)


def test_world_of_one_with_a_plain_loader_order_is_the_plain_program():
    plain = ddp_bilevel.build("cg", False, False)
    world_of_one = ddp_bilevel.build("cg", "ddp", False)
    plain.run(steps=4)
    world_of_one.run(steps=4)
    assert_close(ddp_bilevel.final(world_of_one), ddp_bilevel.final(plain), 0.0)


def test_checkpoint_written_by_rank_0_resumes_exactly(cases):
    assert cases["checkpoints"] == ["step-000000004.pt"]  # one file, no stray temporaries
    assert_close(cases["resumed"], cases["cg_shuffled"])
    assert_close(cases["resumed"], reference("cg_shuffled"))


def test_a_global_batch_the_world_size_does_not_divide_is_an_error(cases):
    assert cases["not_divisible"].startswith("DistributedError: level 'low' (")
    assert ("its DataLoader's batch_size is 7, the global batch, which the 2 ranks cannot "
            "split evenly") in cases["not_divisible"]
    assert "Use a batch_size that is a multiple of 2." in cases["not_divisible"]


def test_ranks_that_traced_different_programs_are_an_error(cases):
    message = cases["mismatch"]
    assert message.startswith("DistributedError: rank 1 traced a different program than rank 0: "
                              "the method of level 'up' is CG(iterations=4,")
    assert "but CG(iterations=5," in message


def test_parameters_drifting_apart_are_caught(cases):
    # A custom rule that uses its rank's Hessian without mlodsl's reductions.
    assert cases["drift"].startswith(
        "DistributedError: parameters drifted apart between ranks after program step 3: "
        "level(s) up differ between rank 0 and rank 1.")


@pytest.fixture(scope="module")
def failures(tmp_path_factory, cases) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp-failures")
    done = launch("failures", out, cases["folder"] / "ckpts")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"failures-{rank}.pt") for rank in (0, 1)]


def test_a_new_launch_resumes_the_checkpoint_exactly(cases, failures):
    for rank in (0, 1):
        resumed = failures[rank]["resumed"]
        for level in ("low", "up"):  # same ranks, same operations: bitwise
            assert all(torch.equal(a, b) for a, b in zip(resumed[level],
                                                         cases["cg_shuffled"][level]))


def test_a_rank_that_raises_is_named_at_once(failures):
    seen = failures[0]["fail"]
    assert seen["message"].startswith(
        "DistributedError: rank 1 failed: RuntimeError: boom on purpose (while running level "
        "'low' (")
    assert seen["seconds"] < 2.0  # rank 1 shut its process group down: no timeout waited
    assert failures[1]["fail"]["message"] == "own: boom on purpose"


def test_a_rank_that_hangs_is_named_after_the_timeout(failures):
    seen = failures[0]["stuck"]
    assert seen["message"].startswith("DistributedError: rank(s) 1 did not join the all-reduce")
    assert "within the process-group timeout of 2 s" in seen["message"]
    assert seen["seconds"] < 5.0  # the 2 s timeout plus at most 2 s of grace, not a hang
    # When rank 1 wakes up, it learns that rank 0 gave up on it.
    assert failures[1]["stuck"]["message"].startswith(
        "DistributedError: rank 0 stopped waiting for this rank: DistributedError: rank(s) 1 "
        "did not join")


def test_distributed_option_values(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ml.distributed.resolve(None) is None  # a plain process
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ml.distributed.resolve(None) == ml.distributed.ddp()  # automatic under torchrun
    assert ml.distributed.resolve(False) is None
    assert ml.distributed.resolve("ddp") == ml.distributed.resolve(True) == ml.distributed.ddp()
    custom = ml.distributed.ddp(timeout_s=5, check_every=10)
    assert ml.distributed.resolve(custom) is custom
    with pytest.raises(ValueError, match="ddp check_every must be a positive integer"):
        ml.distributed.ddp(check_every=0)
