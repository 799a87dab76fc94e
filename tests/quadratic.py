"""Small quadratic programs with closed-form hypergradients, shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import mlodsl as ml

DTYPE = torch.float64


@dataclass
class Ridge:
    """Ridge regression with per-feature L2 ``exp(lam_i)``; the upper level fits a validation
    split. ``w*`` and ``dF/dlam`` have closed forms."""

    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    w: torch.nn.Parameter
    lam: torch.nn.Parameter

    def hessian(self) -> torch.Tensor:
        return self.X.T @ self.X / len(self.X) + torch.diag(self.lam.detach().exp())

    def solution(self) -> torch.Tensor:
        return torch.linalg.solve(self.hessian(), self.X.T @ self.y / len(self.X))

    def hypergrad(self) -> torch.Tensor:
        """dF/dlam at w = w*(lam): -exp(lam) * w* * H^{-1} dF/dw."""
        w_star = self.solution()
        g = self.Xv.T @ (self.Xv @ w_star - self.yv) / len(self.Xv)
        return -self.lam.detach().exp() * w_star * torch.linalg.solve(self.hessian(), g)

    def solve_lower(self) -> None:
        with torch.no_grad():
            self.w.copy_(self.solution())


def ridge_from_data(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor,
                    log_decay: float = -1.0) -> Ridge:
    """A ridge problem on given train/validation splits, per-feature decay ``exp(log_decay)``."""
    d = X.shape[1]
    return Ridge(X, y, Xv, yv, torch.nn.Parameter(torch.zeros(d, dtype=X.dtype)),
                 torch.nn.Parameter(torch.full((d,), log_decay, dtype=X.dtype)))


def make_ridge(n: int = 60, d: int = 6, seed: int = 0, scales: torch.Tensor | None = None
               ) -> Ridge:
    """Synthetic ridge data; ``scales`` stretches the features (raises the condition number)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DTYPE)
    Xv = torch.randn(n, d, generator=gen, dtype=DTYPE)
    if scales is not None:
        X, Xv = X * scales, Xv * scales
    truth = torch.randn(d, generator=gen, dtype=DTYPE)
    y = X @ truth + 0.5 * torch.randn(n, generator=gen, dtype=DTYPE)
    yv = Xv @ truth + 0.5 * torch.randn(n, generator=gen, dtype=DTYPE)
    w = torch.nn.Parameter(torch.zeros(d, dtype=DTYPE))
    lam = torch.nn.Parameter(0.3 * torch.randn(d, generator=gen, dtype=DTYPE) - 1.0)
    return Ridge(X, y, Xv, yv, w, lam)


def ridge_program(r: Ridge, grad, lr: float = 0.1, inner_steps: int = 1, **options):
    """Two levels: ``ridge`` trains w, ``hpo`` trains lam through it."""

    @ml.level(module=r.w, optimizer=torch.optim.SGD([r.w], lr=lr))
    def ridge(hpo):
        residual = r.X @ r.w - r.y
        return 0.5 * residual.pow(2).mean() + 0.5 * (hpo.exp() * r.w.pow(2)).sum()

    @ml.level(upper_of="ridge", grad=grad, module=r.lam, inner_steps=inner_steps,
              optimizer=torch.optim.SGD([r.lam], lr=lr))
    def hpo(ridge):
        return 0.5 * (r.Xv @ ridge - r.yv).pow(2).mean()

    return ml.program(ridge, hpo, **options)


@dataclass
class Chain3:
    """Three quadratic levels ``top -> mid -> low`` with constant second derivatives.

    low:  L(w; mu)        = 1/2 w'Pw - w'B mu
    mid:  L(mu; lam, w)   = 1/2 mu'Q mu - mu'C lam + 1/2 |w - c|^2
    top:  F(lam; mu, w)   = 1/2 |w - t|^2 + 1/2 |mu - s|^2 + 1/2 lam'R lam
    """

    P: torch.Tensor
    B: torch.Tensor
    Q: torch.Tensor
    C: torch.Tensor
    R: torch.Tensor
    c: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor
    w: torch.nn.Parameter
    mu: torch.nn.Parameter
    lam: torch.nn.Parameter

    def edgewise(self) -> torch.Tensor:
        """What each method computes at depth: every edge inverts its own level's Hessian with
        the levels below it held fixed (so the mid Hessian is Q, not the reduced one)."""
        w, mu, lam = self.w.detach(), self.mu.detach(), self.lam.detach()
        v_low = w - self.t
        v_mid = (mu - self.s) + self.B.T @ torch.linalg.solve(self.P, v_low)
        return self.R @ lam + self.C.T @ torch.linalg.solve(self.Q, v_mid)

    def total(self) -> torch.Tensor:
        """The true total derivative with mid and low at their best responses:
        w* = K mu with K = P^{-1} B, so d mu*/d lam = (Q + K'K)^{-1} C and
        dF/dlam = R lam + C'(Q + K'K)^{-1} [(mu - s) + K'(w - t)] (exact for quadratics)."""
        w, mu, lam = self.w.detach(), self.mu.detach(), self.lam.detach()
        K = torch.linalg.solve(self.P, self.B)
        inner = (mu - self.s) + K.T @ (w - self.t)
        return self.R @ lam + self.C.T @ torch.linalg.solve(self.Q + K.T @ K, inner)

    def edgewise_identity(self) -> torch.Tensor:
        """The same chain with every inverse Hessian replaced by the identity (finite_diff)."""
        w, mu, lam = self.w.detach(), self.mu.detach(), self.lam.detach()
        v_mid = (mu - self.s) + self.B.T @ (w - self.t)
        return self.R @ lam + self.C.T @ v_mid


def _spd(k: int, gen: torch.Generator, shift: float) -> torch.Tensor:
    A = torch.randn(k, k, generator=gen, dtype=DTYPE)
    return A @ A.T / k + shift * torch.eye(k, dtype=DTYPE)


def make_chain3(dw: int = 5, dmu: int = 4, dlam: int = 3, seed: int = 0) -> Chain3:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    return Chain3(
        P=_spd(dw, gen, 1.0), B=rand(dw, dmu), Q=_spd(dmu, gen, 1.0), C=rand(dmu, dlam),
        R=_spd(dlam, gen, 0.5), c=rand(dw), t=rand(dw), s=rand(dmu),
        w=torch.nn.Parameter(rand(dw)), mu=torch.nn.Parameter(rand(dmu)),
        lam=torch.nn.Parameter(rand(dlam)),
    )


def chain3_program(q: Chain3, grad_top, grad_mid, lr: float = 0.05):
    @ml.level(module=q.w, optimizer=torch.optim.SGD([q.w], lr=lr))
    def low(mid):
        return 0.5 * q.w @ q.P @ q.w - q.w @ (q.B @ mid.module)

    @ml.level(upper_of="low", grad=grad_mid, module=q.mu,
              optimizer=torch.optim.SGD([q.mu], lr=lr))
    def mid(top, low):
        mu = q.mu
        return 0.5 * mu @ q.Q @ mu - mu @ (q.C @ top.module) + 0.5 * (low.module - q.c).pow(2).sum()

    @ml.level(upper_of="mid", grad=grad_top, module=q.lam,
              optimizer=torch.optim.SGD([q.lam], lr=lr))
    def top(mid, low):
        return (0.5 * (low.module - q.t).pow(2).sum() + 0.5 * (mid.module - q.s).pow(2).sum()
                + 0.5 * q.lam @ q.R @ q.lam)

    return ml.program(low, mid, top)


def nonlinear_chain3_program(seed: int = 1, grad_top="exact", grad_mid="exact", lr: float = 0.2):
    """A non-quadratic ``top -> mid -> low`` chain (quartic and tanh terms), so third
    derivatives matter at depth; strongly convex at each level so re-solving converges."""
    q = make_chain3(seed=seed)
    B, C = 0.5 * q.B, 0.5 * q.C

    @ml.level(module=q.w, optimizer=torch.optim.SGD([q.w], lr=lr))
    def low(mid):
        w = q.w
        return 0.5 * w @ q.P @ w + 0.05 * w.pow(4).sum() - w @ torch.tanh(B @ mid.module)

    @ml.level(upper_of="low", grad=grad_mid, module=q.mu,
              optimizer=torch.optim.SGD([q.mu], lr=lr))
    def mid(top, low):
        mu = q.mu
        return (0.5 * mu @ q.Q @ mu + 0.05 * mu.pow(4).sum() - mu @ torch.tanh(C @ top.module)
                + torch.log1p((low.module - q.c).pow(2)).sum())

    @ml.level(upper_of="mid", grad=grad_top, module=q.lam,
              optimizer=torch.optim.SGD([q.lam], lr=lr))
    def top(mid, low):
        return (0.5 * (low.module - q.t).pow(2).sum() + (mid.module - q.s).pow(2).sum()
                + 0.5 * q.lam @ q.R @ q.lam)

    return ml.program(low, mid, top), q


def chain3_modules_program(q: Chain3, grad_top="unroll", grad_mid="unroll",
                           lrs=(0.39, 0.21, 0.0), inner_steps=(1, 1), nonlinear: bool = False,
                           momentum: float = 0.0, top_reads_low: bool = True,
                           low_options=None, mid_options=None, top_options=None, **options):
    """``make_chain3``'s problem with ``low`` and ``mid`` holding their tensors in
    ``ParameterList`` modules (what ``grad="unroll"`` swaps), read through them. ``lrs``: the
    SGD learning rates of low, mid and top; ``inner_steps``: mid's and top's. ``nonlinear``
    adds the quartic and tanh terms of :func:`nonlinear_chain3_program` (third derivatives);
    ``momentum`` is low's and mid's SGD momentum. With ``top_reads_low=False`` the top loss
    reads only ``mid``. ``low_options``, ``mid_options``, ``top_options``: more ``@ml.level``
    arguments."""
    low_module = torch.nn.ParameterList([q.w])
    mid_module = torch.nn.ParameterList([q.mu])
    B, C = (0.5 * q.B, 0.5 * q.C) if nonlinear else (q.B, q.C)

    @ml.level(module=low_module, optimizer=torch.optim.SGD([q.w], lr=lrs[0], momentum=momentum),
              **(low_options or {}))
    def low(mid):
        w, mu = low_module[0], mid.module[0]
        if nonlinear:
            return 0.5 * w @ q.P @ w + 0.05 * w.pow(4).sum() - w @ torch.tanh(B @ mu)
        return 0.5 * w @ q.P @ w - w @ (B @ mu)

    @ml.level(upper_of="low", grad=grad_mid, inner_steps=inner_steps[0], module=mid_module,
              optimizer=torch.optim.SGD([q.mu], lr=lrs[1], momentum=momentum),
              **(mid_options or {}))
    def mid(top, low):
        mu, w = mid_module[0], low.module[0]
        if nonlinear:
            return (0.5 * mu @ q.Q @ mu + 0.05 * mu.pow(4).sum() - mu @ torch.tanh(C @ top.module)
                    + torch.log1p((w - q.c).pow(2)).sum())
        return 0.5 * mu @ q.Q @ mu - mu @ (C @ top.module) + 0.5 * (w - q.c).pow(2).sum()

    @ml.level(upper_of="mid", grad=grad_top, inner_steps=inner_steps[1], module=q.lam,
              optimizer=torch.optim.SGD([q.lam], lr=lrs[2]), **(top_options or {}))
    def top(mid, low):
        return chain3_top_loss(q, mid.module[0], low.module[0], nonlinear)

    @ml.level(upper_of="mid", grad=grad_top, inner_steps=inner_steps[1], module=q.lam,
              optimizer=torch.optim.SGD([q.lam], lr=lrs[2]), name="top", **(top_options or {}))
    def top_without_low(mid):
        return chain3_top_loss(q, mid.module[0], None, nonlinear)

    return ml.program(low, mid, top if top_reads_low else top_without_low, progress=False,
                      **options)


def chain3_top_loss(q: Chain3, mu: torch.Tensor, w: torch.Tensor, nonlinear: bool = False
                    ) -> torch.Tensor:
    """The top level's loss of :func:`chain3_modules_program`."""
    scale = 1.0 if nonlinear else 0.5
    loss = scale * (mu - q.s).pow(2).sum() + 0.5 * q.lam @ q.R @ q.lam
    return loss if w is None else loss + 0.5 * (w - q.t).pow(2).sum()
