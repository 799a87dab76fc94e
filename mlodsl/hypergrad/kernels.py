"""Linear-algebra kernels shared by every hypergradient method.

Vectors over a level's parameters are flat 1-D tensors: one concatenation per call is cheap next
to a Hessian-vector product, and it keeps the solvers plain vector algebra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mlodsl.errors import HypergradError

_NO_SECOND_ORDER = (
    "level '{level}': autograd could not differentiate the gradient of its loss a second "
    "time ({error}). Some operations (fused attention kernels, some custom functions) have no "
    "double-backward rule. Use grad='finite_diff' on the level above it, which needs only "
    "first derivatives."
)


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``like``."""
    pieces = torch.split(vector, [t.numel() for t in like])
    return [piece.view_as(t) for piece, t in zip(pieces, like)]


def flat_or_zeros(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]
                  ) -> torch.Tensor | None:
    """Flatten ``grads``; ``None`` entries become zeros. All ``None`` gives ``None``."""
    if all(g is None for g in grads):
        return None
    return flat([torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)])


def grad_graph(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Flat gradient of ``loss`` w.r.t. ``params``, kept differentiable for HVPs."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    g = flat_or_zeros(grads, params)
    if g is None or not g.requires_grad:
        # The loss is linear in the parameters (or ignores them): its Hessian is zero.
        g = (flat(params) * 0.0) if g is None else g + flat(params) * 0.0
    return g


def hvp(g: torch.Tensor, params: Sequence[torch.Tensor], v: torch.Tensor, level: str
        ) -> torch.Tensor:
    """Hessian-vector product ``H v`` from a differentiable flat gradient ``g``."""
    try:
        out = torch.autograd.grad(g, params, grad_outputs=v, retain_graph=True,
                                  allow_unused=True)
    except RuntimeError as error:
        if "double backward" in str(error) or "derivative for" in str(error):
            raise HypergradError(_NO_SECOND_ORDER.format(level=level, error=error)) from error
        raise
    result = flat_or_zeros(out, params)
    return torch.zeros_like(v) if result is None else result


def mixed_vjp(g: torch.Tensor, upper_params: Sequence[torch.Tensor], u: torch.Tensor,
              retain_graph: bool = False) -> torch.Tensor | None:
    """``(d^2 L / d lam d w) u``: the mixed second derivative applied to ``u``.

    Returns ``None`` when the lower gradient ``g`` does not depend on the upper parameters.
    """
    if not g.requires_grad:
        return None
    out = torch.autograd.grad(g, upper_params, grad_outputs=u, retain_graph=retain_graph,
                              allow_unused=True)
    return flat_or_zeros(out, upper_params)


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
        return assemble(columns, n)
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
        return torch.cat(rows)


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       x0: torch.Tensor | None, iterations: int, tol: float
                       ) -> tuple[torch.Tensor, int, float]:
    """Solve ``A x = b`` for symmetric positive definite ``A``.

    The search direction is built from the *new* residual (Hestenes-Stiefel), and the loop
    exits once ``||r|| <= tol * ||b||``, so more iterations never make the answer worse and a
    converged solve never divides zero by zero.

    Returns:
        ``(x, iterations used, final relative residual)``.
    """
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return torch.zeros_like(b), 0, 0.0
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x, r = x0.clone(), b - matvec(x0)
    p = r.clone()
    rs = float(r @ r)
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
                             radius: float) -> tuple[torch.Tensor | None, float]:
    """``(d^2 L / d lam d w) d`` by a central difference of ``dL/dlam`` at ``w +- eps d``.

    ``eps = radius / ||d||``. The lower parameters are restored bit-exactly, also on error.
    Returns ``(product or None if L ignores lam, eps)``.
    """
    d_norm = float(direction.norm())
    if d_norm == 0.0:
        return torch.zeros_like(flat(upper_params)), 0.0
    eps = radius / d_norm
    shift = [piece * eps for piece in unflat(direction, params)]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            torch._foreach_add_(params, shift)
        plus = _grad_or_none(loss(), upper_params)
        with torch.no_grad():
            for p, s, orig in zip(params, shift, saved):
                p.copy_(orig).sub_(s)
        minus = _grad_or_none(loss(), upper_params)
    finally:
        # Copy back the saved values: adding and subtracting eps*d is not bit-exact.
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
    if plus is None:
        return None, eps
    return (plus - minus) / (2 * eps), eps


def _grad_or_none(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    return flat_or_zeros(torch.autograd.grad(loss, params, allow_unused=True), params)
