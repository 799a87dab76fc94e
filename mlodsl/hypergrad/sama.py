"""SAMA hypergradient (Choe et al. 2023): finite difference along an optimizer-preconditioned
direction, so adaptive lower optimizers are modelled without any second-order graph."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mlodsl.errors import HypergradError
from mlodsl.hypergrad import kernels
from mlodsl.hypergrad.base import EdgeProblem, EdgeResult

SUPPORTED = ("SGD", "Adam", "AdamW")

_UNSUPPORTED = (
    "grad='sama' on edge {upper} -> {lower}: level '{lower}' uses {name}, but sama models the "
    "update Jacobian of {supported} only. Use one of those for '{lower}', or grad='finite_diff' "
    "/ 'cg' on '{upper}'."
)


def update_jacobian(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    """Diagonal of d(update)/d(gradient) of ``optimizer`` for ``param``, from its state.

    SGD: ``lr`` (times ``1 - dampening`` with momentum, plus ``momentum`` for Nesterov).
    Adam/AdamW: ``lr (1 - beta1) / (1 - beta1^t) / (sqrt(v_hat) + eps)``, the first moment's path
    (the second moment's dependence on the gradient is neglected, as in SAMA).
    """
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    lr = float(group["lr"])
    name = type(optimizer).__name__
    if name == "SGD":
        momentum, dampening = group.get("momentum", 0.0), group.get("dampening", 0.0)
        if not momentum:
            return torch.full_like(param, lr)
        factor = (1.0 - dampening) * (1.0 + momentum if group.get("nesterov") else 1.0)
        return torch.full_like(param, lr * factor)
    state = optimizer.state.get(param, {})
    beta1, beta2 = group["betas"]
    if "exp_avg_sq" not in state:  # before the first step Adam's first update is lr * sign(g)
        return torch.full_like(param, lr)
    step = float(state["step"])
    v_hat = state["exp_avg_sq"] / (1.0 - beta2 ** step)
    scale = lr * (1.0 - beta1) / (1.0 - beta1 ** step)
    return scale / (v_hat.sqrt() + group["eps"])


@dataclass(frozen=True)
class Sama:
    """``(dw*/dlam)^T v ~ -(d^2 L / d lam d w) P v`` with ``P`` the update Jacobian."""

    radius: float = 0.01
    name: str = "sama"

    def __call__(self, edge: EdgeProblem, v: torch.Tensor) -> EdgeResult:
        optimizer = edge.lower_optimizer
        kind = type(optimizer).__name__
        if kind not in SUPPORTED:
            raise HypergradError(_UNSUPPORTED.format(
                upper=edge.upper, lower=edge.lower, name=kind, supported=", ".join(SUPPORTED)))
        scale = kernels.flat([update_jacobian(optimizer, p) for p in edge.lower_params])
        direction = scale * v
        mixed, eps = kernels.central_mixed_difference(
            edge.lower_loss, edge.lower_params, edge.upper_params, direction, self.radius,
            scale=-1.0)
        diagnostics = {"eps": eps, "preconditioner_mean": float(scale.mean())}
        return EdgeResult(mixed, diagnostics)


def sama(*, radius: float = 0.01) -> Sama:
    """SAMA hypergradient (Choe et al. 2023, "Making Scalable Meta Learning Practical").

    Treats the lower level's response as one step of its own optimizer: the vector ``v`` is
    preconditioned by the diagonal update Jacobian of the lower optimizer (SGD with momentum,
    Adam, AdamW), then the mixed second derivative is taken by a central finite difference.

    Args:
        radius: Perturbation size ``r``; ``eps = r / ||P v||``.
    """
    if not radius > 0 or math.isinf(radius):
        raise ValueError(f"sama radius must be a positive number, got {radius}")
    return Sama(radius=radius)
