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
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Blocks:
    """Where the blocks lie in a flat vector: the concatenation of tensors whose leading
    dimension is the block (task), so each tensor's slice holds ``tasks`` contiguous runs.

    Attributes:
        tasks: The number of blocks.
        sizes: The length of each tensor's slice of the flat vector.
    """

    tasks: int
    sizes: tuple[int, ...]

    def dots(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The per-block inner products of ``a`` and ``b``, shape ``(tasks,)``."""
        pieces = (a * b).split(self.sizes)
        total = pieces[0].view(self.tasks, -1).sum(1)
        for piece in pieces[1:]:
            total += piece.view(self.tasks, -1).sum(1)
        return total

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """A flat vector holding ``values[i]`` on every entry of block ``i``."""
        return torch.cat([values.repeat_interleave(size // self.tasks) for size in self.sizes])

    def scale(self, factors: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x`` with block ``i`` multiplied by ``factors[i]``."""
        return torch.cat([(piece.view(self.tasks, -1) * factors[:, None]).reshape(-1)
                          for piece in x.split(self.sizes)])


def layout(stacked: Sequence[torch.Tensor]) -> Blocks:
    """The blocks of the flat concatenation of ``stacked`` (leading dimension: the block)."""
    return Blocks(stacked[0].shape[0], tuple(t.numel() for t in stacked))


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       blocks: Blocks, iterations: int, tol: float
                       ) -> tuple[torch.Tensor, int, float, int]:
    """Solve ``A x = b`` for a block-diagonal symmetric ``A`` with ``blocks``, from zero, each
    block as :func:`mlodsl.hypergrad.kernels.conjugate_gradient` would alone: it stops at
    ``||r_i|| <= tol * ||b_i||`` or at non-positive curvature, and falls back to zero if its
    residual ended above its start.

    Returns:
        ``(x, most iterations any block used, mean final relative residual of the blocks,
        blocks left at zero)``: a block is left at zero when its first direction already has
        non-positive curvature or its residual grew (a non-convex or ill-conditioned task).
    """
    b_norm = blocks.dots(b, b).sqrt()
    x, r = torch.zeros_like(b), b.clone()
    p = r.clone()
    rs = start_rs = b_norm.square()
    active = b_norm > 0
    zero = torch.zeros_like(rs)
    used = 0
    while used < iterations and bool(active.any()):
        ap = matvec(p)
        curvature = blocks.dots(p, ap)
        active = active & (curvature > 0)  # not positive definite along p: stop this block
        alpha = torch.where(active, rs / curvature, zero)
        # Stopped blocks are left as they are by selection, never by a zero factor: 0 * inf
        # would be NaN, and a block whose products are not finite must not move.
        on = blocks.spread(active)
        x = torch.where(on, x + blocks.scale(alpha, p), x)
        r = torch.where(on, r - blocks.scale(alpha, ap), r)
        rs_new = blocks.dots(r, r)
        beta = torch.where(active, rs_new / rs, zero)
        p = torch.where(on, blocks.scale(beta, p) + r, p)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs.sqrt() > tol * b_norm)
        used += 1
    worse = ~(rs <= start_rs)  # also catches NaN
    if bool(worse.any()):  # select, not multiply: 0 * inf is NaN
        x = torch.where(blocks.spread(worse), torch.zeros_like(x), x)
        rs = torch.where(worse, start_rs, rs)
    posed = b_norm > 0
    relative = rs[posed].sqrt() / b_norm[posed]
    residual = float(relative.mean()) if bool(posed.any()) else 0.0
    return x, used, residual, int((relative >= 1.0).sum())
