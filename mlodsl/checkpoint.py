"""Checkpoints: the whole state of a run, written atomically, read without running code."""

from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import torch

from mlodsl.errors import MlodslError

FORMAT = "mlodsl-checkpoint"
VERSION = 1
_PATTERN = "step-*.pt"


class CheckpointError(MlodslError):
    """A checkpoint could not be written, read, or does not fit the program."""


def capture(runtime: Any) -> dict[str, Any]:
    """Everything needed to continue ``runtime`` exactly: parameters, buffers, optimizer,
    scheduler and scaler states, data positions, counters, solver states, RNG states, history."""
    levels = {}
    for name, node in runtime.nodes.items():
        levels[name] = {
            "params": [p.detach() for p in node.params],
            "buffers": _buffers(node.module),
            "optimizer": node.optimizer.state_dict(),
            "scheduler": (node.scheduler.state_dict()
                          if hasattr(node.scheduler, "state_dict") else None),
            "precision": runtime.precision[name].state_dict(),
            "data": runtime.streams[name].state_dict(),
            "steps": runtime.level_steps[name],
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "levels": levels,
        "global_step": runtime.global_step,
        "partial": list(runtime.partial) if runtime.partial is not None else None,
        "edges": {f"{u}->{l}": dict(e.state) for (u, l), e in runtime.edges.items()},
        "history": runtime.history.state_dict(),
        "early_stopping": (runtime.early_stopper.state_dict()
                           if runtime.early_stopper is not None else None),
        "rng": _rng_states(),
        # Distributed: every rank's random states (dropout draws differ between ranks).
        "rank_rng": _every_rank_rng(runtime.dist) if runtime.dist.world > 1 else None,
    }


def restore(runtime: Any, state: dict[str, Any], where: str) -> None:
    """Put ``state`` (from :func:`capture`) into ``runtime``, after checking it fits."""
    _check_fits(runtime, state, where)
    with torch.no_grad():
        for name, node in runtime.nodes.items():
            saved = state["levels"][name]
            for p, value in zip(node.params, saved["params"]):
                p.copy_(value)
            module_buffers = dict(_named_buffers(node.module))
            for key, value in saved["buffers"].items():
                module_buffers[key].copy_(value)
    for name, node in runtime.nodes.items():
        saved = state["levels"][name]
        node.optimizer.load_state_dict(saved["optimizer"])
        if saved["scheduler"] is not None and hasattr(node.scheduler, "load_state_dict"):
            node.scheduler.load_state_dict(saved["scheduler"])
        runtime.precision[name].load_state_dict(saved["precision"])
        runtime.level_steps[name] = saved["steps"]
    runtime.global_step = state["global_step"]
    runtime.partial = tuple(state["partial"]) if state["partial"] is not None else None
    for key, edge in runtime.edges.items():
        edge.state.clear()
        edge.state.update(state["edges"].get(f"{key[0]}->{key[1]}", {}))
    runtime.history.load_state_dict(state["history"])
    if runtime.unroller is not None:  # trajectories are not saved: restart from the loaded state
        runtime.unroller.reset()
    if runtime.early_stopper is not None and state["early_stopping"] is not None:
        runtime.early_stopper.load_state_dict(state["early_stopping"])
    # Data positions last: replaying an epoch's order uses (and then restores) the RNG.
    for name in runtime.nodes:
        runtime.streams[name].load_state_dict(state["levels"][name]["data"])
    ranks = state.get("rank_rng")
    world = runtime.dist.world
    _set_rng_states(ranks[runtime.dist.rank] if ranks is not None and len(ranks) == world
                    else state["rng"])


def write(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write atomically: a temporary file in the same folder, flushed, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable where the platform allows it
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass
    return path


def read(path: str | os.PathLike[str], map_location: Any = None) -> tuple[dict[str, Any], str]:
    """Load a checkpoint file, or the newest in a folder, with ``weights_only=True``.

    Returns:
        ``(state, the file read)``.

    Raises:
        CheckpointError: missing, truncated, tampered with, or not an mlodsl checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoint ({_PATTERN}) in folder {path}")
        path = found
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            KeyError, OSError) as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {str(error).splitlines()[0]}. The file is "
            "truncated, damaged, not a checkpoint, or holds objects other than tensors and plain "
            "data (mlodsl loads with weights_only=True and never runs code from a checkpoint)."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mlodsl checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} is an mlodsl checkpoint of format version "
                              f"{state.get('version')}; this mlodsl reads version {VERSION}")
    return state, str(path)


def latest(folder: str | os.PathLike[str]) -> Path | None:
    """The newest periodic checkpoint in ``folder`` (by step), or ``None``."""
    files = sorted(Path(folder).glob(_PATTERN))
    return files[-1] if files else None


def periodic_path(folder: str | os.PathLike[str], step: int) -> Path:
    """Where the periodic checkpoint of program step ``step`` goes."""
    return Path(folder) / f"step-{step:09d}.pt"


def prune(folder: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest ``keep`` periodic checkpoints."""
    for old in sorted(Path(folder).glob(_PATTERN))[:-keep]:
        old.unlink(missing_ok=True)


def _named_buffers(module: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(module, torch.nn.Module):
        return list(module.named_buffers())
    return []


def _buffers(module: Any) -> dict[str, torch.Tensor]:
    return {name: buffer.detach() for name, buffer in _named_buffers(module)}


def _check_fits(runtime: Any, state: dict[str, Any], where: str) -> None:
    saved, ours = set(state["levels"]), set(runtime.nodes)
    if saved != ours:
        raise CheckpointError(
            f"checkpoint {where} holds levels {sorted(saved)}, but this program has "
            f"{sorted(ours)}; load it into a program traced from the same levels."
        )
    for name, node in runtime.nodes.items():
        shapes = [tuple(t.shape) for t in state["levels"][name]["params"]]
        if shapes != [tuple(p.shape) for p in node.params]:
            raise CheckpointError(
                f"checkpoint {where}: level '{name}' ({node.defined_at}) has parameters of "
                f"shapes {[tuple(p.shape) for p in node.params]}, the checkpoint {shapes}."
            )


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:
        return states
    kind, keys, pos, has_gauss, cached = numpy.random.get_state()
    states["numpy"] = [kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss),
                       float(cached)]
    return states


def _every_rank_rng(dist: Any) -> list[dict[str, Any]]:
    # Sent as torch.save bytes: pickling tensors in all_gather_object is not reliable.
    buffer = io.BytesIO()
    torch.save(_rng_states(), buffer)
    gathered = dist.gather_objects(buffer.getvalue(), "the gathering of every rank's random "
                                   "states for a checkpoint")
    return [torch.load(io.BytesIO(b), weights_only=True) for b in gathered]


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy

        kind, keys, pos, has_gauss, cached = states["numpy"]
        numpy.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
