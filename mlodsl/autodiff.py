"""Reverse-mode products for the interpreter's hot path, without ``torch.autograd.grad``'s
Python preamble.

Before its C++ engine runs, ``torch.autograd.grad`` normalizes its arguments, checks for
``__torch_function__`` overrides, compares every output's shape with its gradient's through the
symbolic-shape helpers and builds default gradients, in Python: about 40 us per call on a
2-core CPU (torch 2.13), next to 60-100 us for the backward pass of a small network. A
bilevel step with five conjugate-gradient iterations makes nine such calls, so the preamble
alone costs more than everything the interpreter itself does.

For the calls mlodsl makes, those checks cannot fail: it builds the output gradients itself,
with the outputs' shapes. So :func:`grad` and :func:`backward` hand plain tensors straight to
the engine, with exactly the arguments ``torch.autograd.grad`` would pass, and leave anything
unusual (tensor subclasses such as ``DTensor``, nested tensors, outputs that do not require
grad, gradients of another shape, no default gradient for a non-scalar output) to the public
functions, which raise their usual errors. The engine's entry point is checked once, on a tiny
graph; if a future torch lacks it or changed its signature, everything takes the public path.

Set the environment variable ``MLODSL_PUBLIC_AUTOGRAD=1`` (or call :func:`use_engine`) to
always go through the public functions.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import torch

from mlodsl.fastpath import FastPath

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_ENGINE = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
# torch stashes the caller's context for backward passes that run on device threads (so
# torch.compile's configuration is visible there); do the same where torch has the hook.
_STASH = getattr(torch._C, "_stash_obj_in_tls", None)
_UNSTASH = getattr(torch._C, "_remove_obj_from_tls", None)



def use_engine(enabled: bool) -> bool:
    """Turn the direct engine calls on or off; returns the previous setting. Off, every
    product goes through ``torch.autograd.grad`` / ``torch.autograd.backward``."""
    return _PATH.use(enabled)


def engine_in_use() -> bool:
    """Whether products go straight to the autograd engine (checking it works, once)."""
    return _PATH.in_use()


def _root_grads(outputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor | None]
                ) -> tuple[torch.Tensor, ...] | None:
    """The engine's root gradients, or ``None`` where the public function must decide."""
    roots = []
    for out, g in zip(outputs, grad_outputs):
        if type(out) not in _PLAIN or out.is_nested or not out.requires_grad:
            return None
        if g is None:
            if out.numel() != 1:
                return None
            g = torch.ones_like(out, memory_format=torch.preserve_format)
        elif type(g) not in _PLAIN or g.shape != out.shape or g.dtype != out.dtype:
            return None
        roots.append(g)
    return tuple(roots)


def _engine_works() -> bool:
    """Whether the engine's entry point takes the arguments this module passes (checked once,
    on a two-element graph, so a future torch that changed it falls back rather than fails)."""
    try:
        # Wherever the first call happens (under no_grad or inference_mode too), test on a
        # graph of its own.
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.ones(2, requires_grad=True)
            y = (x * x).sum()
        (dx,) = _ENGINE.run_backward((y,), (torch.ones_like(y),), False, False, (x,), True, False)
        return isinstance(dx, torch.Tensor) and bool(torch.equal(dx, torch.full((2,), 2.0)))
    except Exception:  # noqa: BLE001 - whatever fails, the public functions are the way
        return False


def _run(outputs: tuple[torch.Tensor, ...], roots: tuple[torch.Tensor, ...], keep_graph: bool,
         create_graph: bool, inputs: tuple[torch.Tensor, ...], allow_unused: bool,
         accumulate: bool) -> tuple[torch.Tensor | None, ...]:
    """What ``torch.autograd``'s own ``_engine_run_backward`` does, minus its debug logging."""
    if _STASH is not None:
        _STASH("context", contextvars.copy_context())
    try:
        return _ENGINE.run_backward(outputs, roots, keep_graph, create_graph, inputs,
                                    allow_unused, accumulate)
    finally:
        if _UNSTASH is not None:
            _UNSTASH("context")


_PATH = FastPath(callable(getattr(_ENGINE, "run_backward", None)), "MLODSL_PUBLIC_AUTOGRAD",
                 _engine_works)


def grad(outputs: torch.Tensor | Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
         grad_outputs: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
         retain_graph: bool | None = None, create_graph: bool = False,
         allow_unused: bool = False) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph, create_graph,
    allow_unused=allow_unused)``, by the shortest path that gives the same result."""
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    if grad_outputs is None:
        grad_outputs = (None,) * len(outputs)
    elif isinstance(grad_outputs, torch.Tensor):
        grad_outputs = (grad_outputs,)
    inputs = tuple(inputs)
    if (_PATH.in_use() and len(grad_outputs) == len(outputs) and inputs
            and all(type(t) in _PLAIN for t in inputs)):
        roots = _root_grads(outputs, grad_outputs)
        if roots is not None:
            keep = create_graph if retain_graph is None else retain_graph
            return _run(outputs, roots, keep, create_graph, inputs, allow_unused, False)
    return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                               create_graph=create_graph, allow_unused=allow_unused)


def backward(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> None:
    """``loss.backward(inputs=inputs)``: accumulate ``d loss / d input`` into each input's
    ``.grad``, by the shortest path that gives the same result."""
    inputs = tuple(inputs)
    if _PATH.in_use() and inputs and all(type(t) in _PLAIN for t in inputs):
        roots = _root_grads((loss,), (None,))
        if roots is not None:
            _run((loss,), roots, False, False, inputs, True, True)
            return
    loss.backward(inputs=list(inputs))
