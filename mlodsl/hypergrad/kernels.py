"""Linear-algebra kernels shared by every hypergradient method.

Vectors over a level's parameters are flat 1-D tensors: one concatenation per call is cheap next
to a Hessian-vector product, and it keeps the solvers plain vector algebra.

In a distributed run every product of a lower level's loss (Hessian-vector, mixed derivative,
dense Jacobian, central difference) is averaged over the ranks where it is computed, with one
all-reduce of its flat vector (:func:`mlodsl.distributed.mean_`, the identity otherwise): the
result is the product of the global-batch loss, so every solver built on these kernels takes the
same steps on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mlodsl import autodiff, distributed
from mlodsl.errors import HypergradError

_NO_SECOND_ORDER = (
    "level '{level}': autograd could not differentiate the gradient of its loss a second "
    "time ({error}). Some operations (fused attention kernels, some custom functions) have no "
    "double-backward rule. Use grad='finite_diff' on the level above it, which needs only "
    "first derivatives."
)


_NO_CURVATURE = (
    "level '{level}': the gradient of its loss does not depend on its parameters, so there is "
    "no Hessian to invert. Either the loss is linear in them (it has no minimum to "
    "differentiate through) or an operation in it has no second-order rule (custom autograd "
    "functions marked once_differentiable, some fused kernels). Use grad='finite_diff' on the "
    "level above it, which needs only first derivatives."
)


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (a view when there is only one)."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``like``."""
    if len(like) == 1:
        return [vector.view_as(like[0])]
    pieces = torch.split(vector, [t.numel() for t in like])
    return [piece.view_as(t) for piece, t in zip(pieces, like)]


def flat_or_zeros(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]
                  ) -> torch.Tensor | None:
    """Flatten ``grads``; ``None`` entries become zeros. All ``None`` gives ``None``."""
    # Identity tests only: `None in grads` would call Tensor.__eq__ on every gradient.
    for g in grads:
        if g is None:
            break
    else:  # the common case: every gradient is there
        return flat(grads)
    if all(g is None for g in grads):
        return None
    return flat([torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)])


def grad_graph(loss: torch.Tensor, params: Sequence[torch.Tensor], level: str) -> torch.Tensor:
    """Flat gradient of ``loss`` w.r.t. ``params``, kept differentiable for HVPs.

    Raises:
        HypergradError: the gradient does not depend on the parameters: the loss is linear in
            them (no minimum to differentiate through) or an operation has no second-order rule.
    """
    grads = autodiff.grad(loss, params, create_graph=True, allow_unused=True)
    g = flat_or_zeros(grads, params)
    if g is None or not g.requires_grad:
        raise HypergradError(_NO_CURVATURE.format(level=level))
    return g


def hvp(g: torch.Tensor, params: Sequence[torch.Tensor], v: torch.Tensor, level: str
        ) -> torch.Tensor:
    """Hessian-vector product ``H v`` from a differentiable flat gradient ``g``."""
    try:
        out = autodiff.grad(g, params, grad_outputs=v, retain_graph=True, allow_unused=True)
    except RuntimeError as error:
        if any(m in str(error) for m in ("double backward", "derivative for", "twice",
                                          "not implemented")):
            raise HypergradError(_NO_SECOND_ORDER.format(level=level, error=error)) from error
        raise
    result = flat_or_zeros(out, params)
    if result is None:  # the gradient's graph never reaches the parameters: H is undefined
        raise HypergradError(_NO_CURVATURE.format(level=level))
    return distributed.mean_(result, f"the all-reduce of a Hessian-vector product of '{level}'")


HVP_MODES = ("reverse", "forward")

_FORWARD_NEEDS_MODULE = (
    "hvp='forward' on level '{level}' needs its module to be an nn.Module (its parameters are "
    "swapped with torch.func.functional_call); it trains a {kind}. Use hvp='reverse'."
)


def check_hvp_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is a known Hessian-vector product mode."""
    if mode not in HVP_MODES:
        raise ValueError(f"hvp must be one of {', '.join(HVP_MODES)}, got {mode!r}")


class _Scope(torch.nn.Module):
    """Holds a level's module so ``functional_call`` can swap its parameters for the duration
    of a call to the level's loss, which refers to the very same module object."""

    def __init__(self, module: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.inner = module
        self._loss = loss

    def forward(self) -> torch.Tensor:
        return self._loss()


def hessian_operator(mode: str, g: torch.Tensor, params: Sequence[torch.Tensor], level: str,
                     module: Any = None, loss: Callable[[], torch.Tensor] | None = None
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` for a level's loss.

    ``"reverse"`` differentiates the kept gradient graph ``g`` again (reverse-over-reverse).
    ``"forward"`` pushes a tangent through ``torch.func.grad`` of the loss
    (forward-over-reverse, ``torch.func.jvp``); it keeps no second-order graph between products.
    """
    if mode == "reverse":
        return lambda v: hvp(g, params, v, level)
    if not isinstance(module, torch.nn.Module) or loss is None:
        raise HypergradError(_FORWARD_NEEDS_MODULE.format(level=level,
                                                          kind=type(module).__name__))
    scope = _Scope(module, loss)
    by_id = {id(p): name for name, p in scope.named_parameters(remove_duplicate=False)}
    names = [by_id[id(p)] for p in params]
    primals = tuple(p.detach() for p in params)

    def loss_at(*tensors: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(scope, dict(zip(names, tensors)), (), strict=False)

    gradient = torch.func.grad(loss_at, argnums=tuple(range(len(params))))

    def forward_hvp(v: torch.Tensor) -> torch.Tensor:
        try:
            _, tangent = torch.func.jvp(gradient, primals, tuple(unflat(v, params)))
        except RuntimeError as error:
            raise HypergradError(_NO_SECOND_ORDER.format(level=level, error=error)) from error
        return distributed.mean_(flat(tangent).detach(),
                                 f"the all-reduce of a Hessian-vector product of '{level}'")

    return forward_hvp


def mixed_vjp(g: torch.Tensor, upper_params: Sequence[torch.Tensor], u: torch.Tensor,
              retain_graph: bool = False) -> torch.Tensor | None:
    """``(d^2 L / d lam d w) u``: the mixed second derivative applied to ``u``.

    Returns ``None`` when the lower gradient ``g`` does not depend on the upper parameters.
    """
    if not g.requires_grad:
        return None
    out = autodiff.grad(g, upper_params, grad_outputs=u, retain_graph=retain_graph,
                        allow_unused=True)
    result = flat_or_zeros(out, upper_params)
    if result is None:
        return None
    return distributed.mean_(result, "the all-reduce of a mixed-derivative product")


def dense_jacobian(out: torch.Tensor, params: Sequence[torch.Tensor], level: str,
                   create_graph: bool = False) -> torch.Tensor:
    """``d out / d params`` as an ``(out.numel(), n_params)`` matrix, one row per output.

    Rows are computed in one batched backward where autograd supports it, else one by one.
    With ``out`` a differentiable gradient this is the Hessian. ``create_graph`` keeps the
    result differentiable (for Jacobians of Jacobians at depth).
    """
    n = out.numel()
    eye = torch.eye(n, dtype=out.dtype, device=out.device)
    width = sum(p.numel() for p in params)

    def assemble(columns: Sequence[torch.Tensor | None], rows: int) -> torch.Tensor:
        return torch.cat([
            torch.zeros(rows, p.numel(), dtype=out.dtype, device=out.device) if c is None
            else c.reshape(rows, -1) for c, p in zip(columns, params)
        ], dim=1)

    if not out.requires_grad:
        return torch.zeros(n, width, dtype=out.dtype, device=out.device)
    try:
        columns = torch.autograd.grad(out, params, grad_outputs=eye, retain_graph=True,
                                      create_graph=create_graph, allow_unused=True,
                                      is_grads_batched=True)
        matrix = assemble(columns, n)
    except RuntimeError:
        # Some operations have no batching rule: fall back to one backward per row.
        rows = []
        for i in range(n):
            try:
                columns = torch.autograd.grad(out, params, grad_outputs=eye[i],
                                              retain_graph=True, create_graph=create_graph,
                                              allow_unused=True)
            except RuntimeError as error:
                raise HypergradError(_NO_SECOND_ORDER.format(level=level, error=error)) from error
            rows.append(assemble(columns, 1))
        matrix = torch.cat(rows)
    if create_graph:  # nested inside exact's dense solves; distributed runs refuse that case
        return matrix
    return distributed.mean_(matrix, f"the all-reduce of a dense Jacobian of '{level}'")


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       x0: torch.Tensor | None, iterations: int, tol: float
                       ) -> tuple[torch.Tensor, int, float]:
    """Solve ``A x = b`` for symmetric ``A``, positive definite or not.

    The search direction is built from the *new* residual (Hestenes-Stiefel), and the loop
    exits once ``||r|| <= tol * ||b||``, so more iterations never make the answer worse and a
    converged solve never divides zero by zero. Where ``A`` is not positive definite (a
    non-convex lower level) the loop stops at the first direction of non-positive curvature, a
    warm start worse than zero is dropped, and an answer whose residual ended above its start is
    replaced by the start: the solver never returns something worse than where it began.

    Returns:
        ``(x, iterations used, final relative residual)``.
    """
    start_rs = float(b @ b)
    b_norm = start_rs ** 0.5
    if b_norm == 0.0:
        return torch.zeros_like(b), 0, 0.0
    x, r, start = torch.zeros_like(b), b.clone(), None  # start None: from zero
    if x0 is not None:
        r0 = b - matvec(x0)
        rs0 = float(r0 @ r0)
        if rs0 < start_rs:
            x, r, start, start_rs = x0.clone(), r0, x0, rs0
    p = r.clone()
    rs = start_rs
    used = 0
    while used < iterations and rs ** 0.5 > tol * b_norm:
        ap = matvec(p)
        curvature = float(p @ ap)
        if curvature <= 0.0:
            break  # not positive definite along p: stop rather than step uphill
        alpha = rs / curvature
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        rs_new = float(r @ r)
        p.mul_(rs_new / rs).add_(r)
        rs = rs_new
        used += 1
    if not rs <= start_rs:  # also catches NaN
        return (torch.zeros_like(b) if start is None else start.clone(), used,
                start_rs ** 0.5 / b_norm)
    return x, used, rs ** 0.5 / b_norm


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor,
                    iterations: int, generator: torch.Generator | None = None) -> float:
    """Estimate the largest eigenvalue magnitude of a symmetric operator."""
    x = torch.randn(like.shape, dtype=like.dtype, device="cpu", generator=generator)
    x = (x / x.norm()).to(like.device)
    estimate = 0.0
    for _ in range(iterations):
        y = matvec(x)
        estimate = float(y.norm())
        if estimate == 0.0:
            return 0.0
        x = y / estimate
    return estimate


def central_mixed_difference(loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                             upper_params: Sequence[torch.Tensor], direction: torch.Tensor,
                             radius: float, scale: float = 1.0
                             ) -> tuple[torch.Tensor | None, float]:
    """``scale * (d^2 L / d lam d w) d`` by a central difference of ``dL/dlam`` at
    ``w +- eps d``, ``eps = radius / ||d||``.

    The lower parameters are restored bit-exactly, also on error.
    Returns ``(product or None if L ignores lam, eps)``.
    """
    d_norm = float(direction.norm())
    if d_norm == 0.0:
        return torch.zeros_like(flat(upper_params)), 0.0
    eps = radius / d_norm
    shift = unflat(direction * eps, params)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            torch._foreach_add_(params, shift)
        plus = _grad_or_none(loss(), upper_params)
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
            torch._foreach_sub_(params, shift)
        minus = _grad_or_none(loss(), upper_params)
    finally:
        # Copy back the saved values: adding and subtracting eps*d is not bit-exact.
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
    if plus is None:
        return None, eps
    product = (plus - minus).mul_(scale / (2 * eps))
    return distributed.mean_(product, "the all-reduce of a finite-difference product"), eps


def _grad_or_none(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    return flat_or_zeros(autodiff.grad(loss, params, allow_unused=True), params)
