"""Differentiable twins of torch.optim optimizers, for unrolled lower levels.

Unrolled differentiation (Maclaurin et al. 2015; Franceschi et al. 2017; MAML, Finn et al. 2017)
takes a lower level's optimizer steps out of place, so that the level above can backpropagate
through them. Each supported optimizer has one small pure update rule with torch's exact maths,
its settings read from the real optimizer's param groups at every step.

A state is one dict per parameter with exactly torch's keys and meanings (``optimizer.state[p]``);
a buffer torch has not created yet is absent, so a fresh state is empty. Rules use only
out-of-place tensor operations and never branch on tensor values: steps run under ``vmap``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlodsl.errors import MlodslError

State = dict[str, torch.Tensor]
Settings = Mapping[str, Any]


class UnsupportedOptimizerError(MlodslError):
    """An optimizer, or one of its options, has no exact differentiable twin."""


class ParameterNotInOptimizerError(MlodslError):
    """A parameter to unroll is in none of the optimizer's param groups."""


_UNSUPPORTED_TYPE = (
    "{kind} has no differentiable twin for unrolled steps (grad='unroll'). Supported optimizers: "
    "{supported} (torch.optim's own classes, not subclasses). Train this level with one of them, "
    "or differentiate it implicitly with grad='cg' on the level above, which needs no unrolling."
)

_UNSUPPORTED_OPTION = (
    "{kind} option {option}={value!r} (param group {group}) has no exact differentiable twin for "
    "unrolled steps. Set it to {default}, or use grad='cg' (implicit) on the level above."
)

_COMPLEX = (
    "parameter {index} is complex ({dtype}); unrolled steps support real parameters only. Store "
    "it as torch.view_as_real, or differentiate implicitly with grad='cg' on the level above."
)

_NOT_IN_OPTIMIZER = (
    "parameter {index} (shape {shape}) is in none of the param groups of {kind}, so it has no "
    "settings to unroll with. Pass the tensors the optimizer was built with."
)

# Options that choose an implementation (kernel fusion, graph capture, autograd support), never
# the maths: the twin computes the same update whatever they are.
_IGNORED = frozenset({"foreach", "fused", "capturable", "differentiable"})


def _on(value: float | torch.Tensor) -> bool:
    """Whether a term of the update is present. A tensor hyperparameter may be learnable: its
    term stays even at zero, where it changes nothing but still has a derivative."""
    return isinstance(value, torch.Tensor) or value != 0


def _buffer(state: State, name: str, like: torch.Tensor) -> torch.Tensor:
    """A moment buffer, zeros before torch would have created it."""
    return state[name] if name in state else torch.zeros_like(like)


def _count_dtype(param: torch.Tensor) -> torch.dtype:
    # Bias corrections are computed in this dtype: at least float32 so that counts stay exact,
    # float64 for float64 parameters so that they match torch's Python-float arithmetic.
    return torch.promote_types(param.dtype, torch.float32)


def _steps(state: State, like: torch.Tensor) -> torch.Tensor:
    """The step count, zero before the first step."""
    return state["step"] if "step" in state else like.new_zeros((), dtype=_count_dtype(like))


def _sgd(p: torch.Tensor, g: torch.Tensor, s: State, h: Settings) -> tuple[torch.Tensor, State]:
    """SGD with momentum, dampening, Nesterov momentum and L2 weight decay."""
    g = -g if h["maximize"] else g
    if _on(h["weight_decay"]):
        g = g + h["weight_decay"] * p
    new: State = {}
    if _on(h["momentum"]):
        # torch starts the buffer at the first gradient itself, undamped (it counts no steps).
        buf = (g if "momentum_buffer" not in s
               else h["momentum"] * s["momentum_buffer"] + (1 - h["dampening"]) * g)
        new["momentum_buffer"] = buf
        g = g + h["momentum"] * buf if h["nesterov"] else buf
    return p - h["lr"] * g, new


def _adam(p: torch.Tensor, g: torch.Tensor, s: State, h: Settings, decoupled: bool = False
          ) -> tuple[torch.Tensor, State]:
    """Adam (Kingma & Ba 2015), with AMSGrad (Reddi et al. 2018) and L2 or decoupled decay."""
    lr, (beta1, beta2), decay = h["lr"], h["betas"], h["weight_decay"]
    g = -g if h["maximize"] else g
    if _on(decay):
        if decoupled or h.get("decoupled_weight_decay", False):
            p = p * (1 - lr * decay)
        else:
            g = g + decay * p
    step = _steps(s, p) + 1
    exp_avg = _buffer(s, "exp_avg", p)
    exp_avg = exp_avg + (g - exp_avg) * (1 - beta1)
    exp_avg_sq = _buffer(s, "exp_avg_sq", p) * beta2 + (1 - beta2) * (g * g)
    new = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if h["amsgrad"]:
        exp_avg_sq = new["max_exp_avg_sq"] = torch.maximum(
            _buffer(s, "max_exp_avg_sq", p), exp_avg_sq)
    denom = exp_avg_sq.sqrt() / (1 - beta2 ** step).sqrt() + h["eps"]
    return p - lr / (1 - beta1 ** step) * (exp_avg / denom), new


def _adamw(p: torch.Tensor, g: torch.Tensor, s: State, h: Settings
           ) -> tuple[torch.Tensor, State]:
    """AdamW (Loshchilov & Hutter 2019): Adam whose weight decay shrinks the parameters."""
    return _adam(p, g, s, h, decoupled=True)


def _rmsprop(p: torch.Tensor, g: torch.Tensor, s: State, h: Settings
             ) -> tuple[torch.Tensor, State]:
    """RMSprop (Hinton 2012), centered (Graves 2013) or not, with momentum and L2 decay."""
    alpha = h["alpha"]
    g = -g if h["maximize"] else g
    if _on(h["weight_decay"]):
        g = g + h["weight_decay"] * p
    square_avg = _buffer(s, "square_avg", p) * alpha + (1 - alpha) * (g * g)
    new = {"step": _steps(s, p) + 1, "square_avg": square_avg}
    if h["centered"]:
        grad_avg = _buffer(s, "grad_avg", p)
        grad_avg = new["grad_avg"] = grad_avg + (g - grad_avg) * (1 - alpha)
        square_avg = square_avg - grad_avg * grad_avg
    avg = square_avg.sqrt() + h["eps"]
    if _on(h["momentum"]):
        g = new["momentum_buffer"] = _buffer(s, "momentum_buffer", p) * h["momentum"] + g / avg
        return p - h["lr"] * g, new
    return p - h["lr"] * (g / avg), new


@dataclass(frozen=True)
class _Rule:
    update: Callable[[torch.Tensor, torch.Tensor, State, Settings], tuple[torch.Tensor, State]]
    options: frozenset[str]  # the optimizer's options this rule implements


_ADAM_OPTIONS = frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
                           "decoupled_weight_decay"})

# The one place that switches on optimizer names.
_RULES: dict[str, _Rule] = {
    "SGD": _Rule(_sgd, frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov",
                                  "maximize"})),
    "Adam": _Rule(_adam, _ADAM_OPTIONS),
    "AdamW": _Rule(_adamw, _ADAM_OPTIONS),
    "RMSprop": _Rule(_rmsprop, frozenset({"lr", "alpha", "eps", "weight_decay", "momentum",
                                          "centered", "maximize"})),
}

SUPPORTED: tuple[str, ...] = tuple(_RULES)


def _scalar(v: Any) -> Any:
    """A 1-element tensor hyperparameter as 0-d, as torch reads it: parameters keep their shape."""
    return v.reshape(()) if isinstance(v, torch.Tensor) and v.dim() else v


def _settings(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(map(_scalar, v)) if isinstance(v, tuple) else _scalar(v)
            for k, v in group.items() if k != "params"}


class FunctionalOptimizer:
    """Pure update rule mirroring a torch optimizer's param groups and settings.

    Built by :func:`functional_optimizer`. Parameters are positional: the ``i``-th tensor given
    to :meth:`step` is updated with the settings of the group that holds the ``i``-th parameter
    the twin was built for.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                 rule: _Rule, groups: Sequence[int]) -> None:
        self.optimizer, self.params = optimizer, tuple(params)
        self._rule, self._groups = rule, tuple(groups)

    def init_state(self, params: Sequence[torch.Tensor]) -> list[State]:
        """Per-parameter state to start from.

        Args:
            params: The tensors to be stepped, positional. Those that the wrapped optimizer
                holds state for (its own parameters) start from it; others (fast weights, the
                tensors of another level) start fresh.

        Returns:
            A detached copy of the wrapped optimizer's current state for each parameter when it
            has one (so unrolling continues the real optimizer's moments), else an empty state:
            fresh zeros, created on the first step as torch creates them.
        """
        self._check_count(params)
        states = []
        for p in params:
            kept = self.optimizer.state.get(p, {})
            state = {k: v.detach().clone() for k, v in kept.items()
                     if isinstance(v, torch.Tensor) and k != "step"}
            if "step" in kept:  # torch keeps it on the CPU, in float32 unless float64 is default
                state["step"] = torch.as_tensor(kept["step"]).detach().to(
                    dtype=_count_dtype(p), device=p.device, copy=True)
            states.append(state)
        return states

    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
             state: Sequence[State]) -> tuple[list[torch.Tensor], list[State]]:
        """One update, out of place: the new parameters and the new state; inputs are unchanged.

        Autograd records all of it, so gradients flow to the parameters, to the gradients' graph
        and to any hyperparameter held as a tensor. Settings are read from ``param_groups`` now.
        """
        self._check_count(params, grads, state)
        groups = [_settings(g) for g in self.optimizer.param_groups]
        out = [self._rule.update(p, g, s, groups[i])
               for p, g, s, i in zip(params, grads, state, self._groups)]
        return [p for p, _ in out], [s for _, s in out]

    def write_back(self, params: Sequence[torch.Tensor], state: Sequence[State]) -> None:
        """Hand a state back to the wrapped optimizer, so that its own next step continues
        from it. ``params`` are the optimizer's own tensors, whose state is set."""
        self._check_count(params, state)
        for p, s in zip(params, state):
            target = self.optimizer.state[p]
            for key, value in s.items():
                old = target.get(key)
                like = old if isinstance(old, torch.Tensor) else value
                target[key] = value.detach().to(dtype=like.dtype, device=like.device, copy=True)

    def _check_count(self, *sequences: Sequence[Any]) -> None:
        counts = {len(s) for s in sequences}
        if counts != {len(self.params)}:
            raise ValueError(f"expected {len(self.params)} parameters, gradients and states (one "
                             f"per parameter the twin was built for), got {sorted(counts)}")


def _check_options(optimizer: torch.optim.Optimizer, rule: _Rule, kind: str) -> None:
    """Refuse an option the rule does not implement unless it is at its constructor default,
    where it is harmless (a newer torch may add options)."""
    signature = inspect.signature(type(optimizer).__init__).parameters
    for option in sorted(optimizer.defaults.keys() - rule.options - _IGNORED):
        default = signature[option].default if option in signature else inspect.Parameter.empty
        for index, group in enumerate(optimizer.param_groups):
            value = group.get(option, default)
            if isinstance(value, torch.Tensor) or value != default:
                shown = "its default" if default is inspect.Parameter.empty else repr(default)
                raise UnsupportedOptimizerError(_UNSUPPORTED_OPTION.format(
                    kind=kind, option=option, value=value, group=index, default=shown))


def functional_optimizer(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
                         ) -> FunctionalOptimizer:
    """Build the differentiable twin of ``optimizer`` for ``params``.

    Each parameter uses its own group's settings, read at every step so that a scheduler's
    changes are seen. Options that only choose an implementation (``foreach``, ``fused``,
    ``capturable``, ``differentiable``) are ignored.

    Args:
        optimizer: A ``torch.optim`` optimizer of a type in :data:`SUPPORTED`.
        params: Tensors, each in one of its param groups.

    Raises:
        UnsupportedOptimizerError: Another optimizer type, an option without an exact twin, or
            a complex parameter.
        ParameterNotInOptimizerError: A parameter is in none of the param groups.

    Example:
        >>> w = list(net.parameters())
        >>> twin = functional_optimizer(torch.optim.Adam(w, lr=1e-3), w)
        >>> state = twin.init_state(w)
        >>> w, state = twin.step(w, torch.autograd.grad(loss(w), w, create_graph=True), state)
    """
    cls = type(optimizer)
    kind = f"{cls.__module__}.{cls.__qualname__}"
    rule = _RULES.get(cls.__name__)
    if rule is None or cls is not getattr(torch.optim, cls.__name__, None):
        raise UnsupportedOptimizerError(_UNSUPPORTED_TYPE.format(
            kind=kind, supported=", ".join(SUPPORTED)))
    _check_options(optimizer, rule, kind)
    where = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    for index, p in enumerate(params):
        if id(p) not in where:
            raise ParameterNotInOptimizerError(_NOT_IN_OPTIMIZER.format(
                index=index, shape=tuple(p.shape), kind=kind))
        if p.is_complex():
            raise UnsupportedOptimizerError(_COMPLEX.format(index=index, dtype=p.dtype))
    return FunctionalOptimizer(optimizer, params, rule, [where[id(p)] for p in params])
