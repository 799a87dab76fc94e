"""What every rank of a distributed run must agree on, and how disagreement is reported.

At start-up the ranks compare a fingerprint of the traced program (levels, edges, methods with
their options, parameter shapes, optimizers, data, options); after each ``run`` call, at every
checkpoint and every ``check_every`` program steps they compare a bitwise checksum of every
level's parameters, which proves they did not drift apart.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from mlodsl import sharding
from mlodsl.errors import DistributedError

_FAILED = (
    "rank {culprit} {verb}: {error}. Rank {rank} stopped waiting for it in {what}{at}. "
    "Fix the error on rank {culprit} (its own traceback is in its log) and launch again."
)
_MISSING = (
    "rank(s) {missing} did not join {what}{at} within the process-group timeout of {timeout:g} s "
    "(stuck, much slower than the others, or died without an error); rank {rank} waited there. "
    "Raise ml.distributed.ddp(timeout_s=...) if a rank legitimately needs longer (e.g. "
    "validation on rank 0)."
)


def check_supported(graph: Any) -> None:
    """Refuse what distributed runs cannot do exactly."""
    by_name = {n.name: n for n in graph.levels}
    for node in graph.levels:
        if any(type(p).__name__ == "DTensor" for p in node.params):
            raise DistributedError(
                f"level '{node.name}' ({node.defined_at}) trains sharded parameters (DTensor: "
                "FSDP2 fully_shard or tensor parallelism), which mlodsl does not support yet: "
                "hypergradients are made of torch.autograd.grad calls that FSDP's gradient "
                "hooks never see (docs/design/fsdp.md). Pass the unwrapped module; "
                "distributed='ddp' replicates it on every rank.")
        if getattr(node.method, "unrolls", False) and node.uppers and getattr(
                by_name[node.uppers[0]].method, "unrolls", False):
            raise DistributedError(
                f"level '{node.name}' ({node.defined_at}) unrolls its lowers while "
                f"'{node.uppers[0]}' unrolls it (nested unrolling); distributed runs support "
                "unrolling one level deep only (nested trajectories under all-reduce are not "
                "verified against one process yet). Run it in one process, or use an implicit "
                "method (grad='cg') on one of the two edges.")
        if node.tasks and not getattr(by_name[node.init_from].method, "unrolls", False):
            raise DistributedError(
                f"level '{node.name}' ({node.defined_at}) adapts a task batch (tasks=True) "
                f"below '{node.init_from}', whose implicit method solves one system per task; "
                "distributed runs split task batches only under grad='unroll' (MAML) so far. "
                "Run it in one process, or use grad='unroll' on the upper level.")
        if callable(getattr(node.method, "joint", None)) and any(
                by_name[lower].lowers for lower in node.lowers):
            raise DistributedError(
                f"level '{node.name}' ({node.defined_at}) uses grad='{node.method.name}' "
                "over levels that have levels below them; distributed runs support joint "
                "methods over lowest levels only (its nested dense solves are per rank). Use "
                "grad='cg' (or another edge method) on this level.")


def diagnose(store: Any, rank: int, world: int, what: str, at: str, timeout: float,
             error: BaseException) -> str:
    """Why a collective failed on ``rank``: another rank failed (it left its reason in the
    store), gave up waiting for this one, or never came (stuck or dead)."""
    others = [r for r in range(world) if r != rank]
    try:
        store.set(f"waiting/{rank}", what)
        deadline = time.monotonic() + min(5.0, timeout)
        while True:  # the failed rank may still be writing its reason
            failed = [r for r in others if store.check([f"failed/{r}"])]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not failed:  # no rank failed by itself: did one give up waiting for us?
            failed = [r for r in others if store.check([f"gaveup/{r}"])]
            key = "gaveup"
        else:
            key = "failed"
        if failed:
            reason = store.get(f"{key}/{failed[0]}").decode()
            verb = "failed" if key == "failed" else "stopped waiting for this rank"
            return _FAILED.format(culprit=failed[0], verb=verb, error=reason, rank=rank,
                                  what=what, at=at)
        missing = [r for r in others if not store.check([f"waiting/{r}"])]
    except Exception:  # no store, or its host (rank 0) is gone
        missing = others
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (_MISSING.format(missing=", ".join(map(str, missing)) or "(unknown)",
                            what=what, at=at, timeout=timeout, rank=rank)
            + f" (torch.distributed: {detail})")


def compare_programs(everyone: Sequence[dict[str, str]]) -> None:
    """Raise when a rank's fingerprint differs from rank 0's, naming the first difference."""
    reference = everyone[0]
    for other, theirs in enumerate(everyone[1:], start=1):
        for key in sorted(set(reference) | set(theirs)):
            mine, yours = reference.get(key, "(absent)"), theirs.get(key, "(absent)")
            if mine != yours:
                raise DistributedError(
                    f"rank {other} traced a different program than rank 0: {key} is "
                    f"{yours} on rank {other} but {mine} on rank 0. Every rank must run "
                    "the same script with the same arguments (rank-dependent code belongs "
                    "in data loading, which mlodsl shards for you).")


def compare_checksums(levels: Sequence[str], gathered: Sequence[torch.Tensor], when: str
                      ) -> None:
    """Raise when a rank's parameter checksums differ from rank 0's, naming the levels."""
    for other in range(1, len(gathered)):
        diff = (gathered[other] != gathered[0]).any(dim=1)
        if diff.any():
            bad = [name for name, differs in zip(levels, diff.tolist()) if differs]
            raise DistributedError(
                f"parameters drifted apart between ranks {when}: level(s) "
                f"{', '.join(bad)} differ between rank 0 and rank {other}. A "
                "hypergradient method or hook computed with this rank's values without "
                "mlodsl's reductions (use the kernels in mlodsl.hypergrad.kernels, or "
                "mlodsl.distributed.mean_ on what it returns).")


def fingerprint(graph: Any, data: dict[str, Any]) -> dict[str, str]:
    """What every rank must agree on: levels, edges, methods and their options, parameter
    shapes, optimizers, data and program options, as plain strings."""
    out = {"the levels (bottom-up)": repr([n.name for n in graph.levels])}
    for node in graph.levels:
        at = f"level '{node.name}'"
        out[f"the parameters of {at}"] = repr([(tuple(p.shape), str(p.dtype))
                                               for p in node.params])
        out[f"the method of {at}"] = _plain(node.method)
        out[f"upper_of of {at}"] = repr(node.lowers)
        out[f"the settings of {at}"] = _plain({
            k: getattr(node, k) for k in ("inner_steps", "accumulate", "precision", "warmup",
                                          "init_from", "tasks", "clip_grad_norm")})
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in node.optimizer.param_groups]
        out[f"the optimizer of {at}"] = f"{type(node.optimizer).__name__}{_plain(groups)}"
        out[f"the data of {at}"] = sharding.describe(data[node.name])
    options = {k: v for k, v in graph.options.items()
               if k in ("seed", "validate_every", "checkpoint_every", "on_nonfinite",
                        "distributed")}
    out["the program options"] = _plain(options)
    return out


def _plain(value: Any) -> str:
    """A repr that is the same on every rank (no memory addresses)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        return repr(value.tolist()) if value.numel() <= 16 else f"tensor{tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        fields = ", ".join(f"{f.name}={_plain(getattr(value, f.name))}"
                           for f in dataclasses.fields(value))
        return f"{type(value).__name__}({fields})"
    return type(value).__name__


def checksum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Two int64 sums of the tensors' bits (plain and position-weighted): equal bits give
    equal sums on every platform, whatever the reduction order."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    total = torch.zeros(2, dtype=torch.int64)
    for t in tensors:
        bits = t.detach().contiguous().reshape(-1).view(ints[t.element_size()]).long().cpu()
        weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64) % 65521 + 1
        total += torch.stack([bits.sum(), (bits * weights).sum()])
    return total
