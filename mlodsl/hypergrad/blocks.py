"""Conjugate gradient on a block-diagonal system: one independent solve per block.

A ``tasks=True`` lower level under an implicit method (iMAML over a meta-batch) holds one
parameter vector per task, and its loss is the sum of the tasks' losses, so its Hessian is
block-diagonal. Plain CG on the whole vector would couple the tasks through shared step sizes;
here every scalar of the iteration (step size, direction update, convergence and curvature
tests) is taken per block, so each task gets exactly what CG on its own system gives, while
all blocks share each Hessian-vector product.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def block_index(stacked: Sequence[torch.Tensor]) -> torch.Tensor:
    """The block (task) of each entry of the flat concatenation of ``stacked``, tensors whose
    leading dimension is the task."""
    return torch.cat([torch.arange(t.shape[0], device=t.device).repeat_interleave(t[0].numel())
                      for t in stacked])


def _dots(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    return torch.zeros(count, dtype=a.dtype, device=a.device).index_add_(0, index, a * b)


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       index: torch.Tensor, iterations: int, tol: float
                       ) -> tuple[torch.Tensor, int, float]:
    """Solve ``A x = b`` for a block-diagonal symmetric ``A`` whose blocks ``index`` names,
    from zero, each block as :func:`mlodsl.hypergrad.kernels.conjugate_gradient` would alone:
    it stops at ``||r_i|| <= tol * ||b_i||`` or at non-positive curvature, and falls back to
    zero if its residual ended above its start.

    Returns:
        ``(x, most iterations any block used, largest final relative residual)``.
    """
    count = int(index.max()) + 1
    b_norm = _dots(b, b, index, count).sqrt()
    x, r = torch.zeros_like(b), b.clone()
    p = r.clone()
    rs = start_rs = b_norm.square()
    active = b_norm > 0
    used = 0
    while used < iterations and bool(active.any()):
        ap = matvec(p)
        curvature = _dots(p, ap, index, count)
        active = active & (curvature > 0)  # not positive definite along p: stop this block
        alpha = torch.where(active, rs / curvature, torch.zeros_like(rs))
        x.addcmul_(alpha[index], p)
        r.addcmul_(alpha[index], ap, value=-1.0)
        rs_new = _dots(r, r, index, count)
        beta = torch.where(active, rs_new / rs, torch.zeros_like(rs))
        p = torch.where(active[index], beta[index] * p + r, p)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs.sqrt() > tol * b_norm)
        used += 1
    worse = ~(rs <= start_rs)  # also catches NaN
    if bool(worse.any()):
        x = torch.where(worse[index], torch.zeros_like(x), x)
        rs = torch.where(worse, start_rs, rs)
    solved = b_norm > 0
    residual = (rs[solved].sqrt() / b_norm[solved]).max() if bool(solved.any()) else b.new_zeros(())
    return x, used, float(residual)
