"""Differentiable optimizer twins: torch.optim's exact steps, derivatives against a closed form
and central finite differences, vmap against a loop, errors, schedulers, state hand-back."""

from __future__ import annotations

import pytest
import torch

from mlodsl.functional import (
    SUPPORTED,
    ParameterNotInOptimizerError,
    UnsupportedOptimizerError,
    functional_optimizer,
)

K = 5
SHAPES = ((3, 4), (5,))

CONFIGS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.5, "maximize": True, "foreach": True}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "foreach": False}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "maximize": True, "weight_decay": 0.05,
              "foreach": True}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.2, "amsgrad": True, "maximize": True}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.9}),
    ("RMSprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-4, "weight_decay": 0.1, "momentum": 0.5}),
    ("RMSprop", {"lr": 0.01, "centered": True, "maximize": True, "foreach": True}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in cfg.items())}" for name, cfg in CONFIGS]


def gradients(seed: int, steps: int = K, batch: tuple[int, ...] = ()) -> list[list[torch.Tensor]]:
    """``steps`` gradients per parameter, shrinking so that AMSGrad's maximum matters."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(*batch, *s, generator=gen, dtype=torch.float64) * 0.7 ** k
             for s in SHAPES] for k in range(steps)]


def make(name: str, cfg: dict, seed: int = 0) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """Leaf parameters in two param groups (the second with half the lr) and the optimizer."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()
              for s in SHAPES]
    groups = [{"params": [params[0]]}, {"params": [params[1]], "lr": cfg["lr"] / 2}]
    return params, getattr(torch.optim, name)(groups, **cfg)


def torch_steps(params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                grads: list[list[torch.Tensor]], scheduler=None) -> None:
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def twin_steps(params, optimizer, grads, scheduler=None):
    twin = functional_optimizer(optimizer, params)
    ws, state = [p.detach().clone() for p in params], twin.init_state(params)
    for step in grads:
        ws, state = twin.step(ws, step, state)
        if scheduler is not None:
            scheduler.step()
    return ws, state


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=IDS)
def test_steps_equal_torch(name, cfg, warm):
    reference, ref_opt = make(name, cfg)
    params, opt = make(name, cfg)
    if warm:  # the twin continues the real optimizer's moments and step counts
        torch_steps(reference, ref_opt, gradients(1, 3))
        torch_steps(params, opt, gradients(1, 3))
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()
                      if isinstance(v, torch.Tensor)} for p in params}
    grads = gradients(2)
    ws, state = twin_steps(params, opt, grads)
    torch_steps(reference, ref_opt, grads)
    for w, r in zip(ws, reference):
        torch.testing.assert_close(w, r.detach(), atol=1e-12, rtol=0)
    for s, r in zip(state, reference):
        assert s.keys() == {k for k, v in ref_opt.state[r].items() if v is not None}
        for key, value in s.items():
            torch.testing.assert_close(value, ref_opt.state[r][key].to(value.dtype),
                                       atol=1e-12, rtol=0)
    for p in params:  # out of place: the real optimizer's state is untouched
        for key, value in before[id(p)].items():
            assert torch.equal(opt.state[p][key], value)


def test_init_state_copies_and_detaches():
    params, opt = make("Adam", {"lr": 0.01})
    torch_steps(params, opt, gradients(1, 2))
    state = functional_optimizer(opt, params).init_state(params)
    copy = state[0]["exp_avg"].clone()
    torch_steps(params, opt, gradients(3, 1))  # the real optimizer moves on in place
    assert torch.equal(state[0]["exp_avg"], copy) and not state[0]["exp_avg"].requires_grad
    assert state[0]["step"].dtype == torch.float64 and float(state[0]["step"]) == 2
    # Other tensors (fast weights, another level's parameters) start fresh.
    others = [p.detach().clone() for p in params]
    assert functional_optimizer(opt, params).init_state(others) == [{}, {}]


def quadratic(d: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    b, w0, target = (torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(3))
    return q, lam, q @ torch.diag(lam) @ q.T, b, w0, target


def test_sgd_derivatives_match_closed_form():
    q, lam, a, b, w0, target = quadratic()
    w0 = w0.requires_grad_()
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    anchor = torch.zeros_like(w0, requires_grad=True)
    opt = torch.optim.SGD([anchor], lr=0.0)
    opt.param_groups[0]["lr"] = lr  # a learnable lr owned by another level
    twin = functional_optimizer(opt, [anchor])
    ws, state = [w0], twin.init_state([w0])
    for _ in range(K):
        w = ws[0]
        loss = 0.5 * w @ a @ w - b @ w
        ws, state = twin.step(ws, torch.autograd.grad(loss, ws, create_graph=True), state)
    residual = ws[0] - target
    d_w0, d_lr = torch.autograd.grad(0.5 * residual @ residual, (w0, lr))

    # In A's eigenbasis with c = 1 - lr*lam: w_K = c^K w_0 + (1 - c^K) b / lam, so
    # dw_K/dw_0 = Q c^K Q' and dw_K/dlr = Q K c^(K-1) (b - lam w_0) (tilde coordinates).
    c = 1 - lr.detach() * lam
    w0_, b_ = q.T @ w0.detach(), q.T @ b
    w_k = q @ (c ** K * w0_ + (1 - c ** K) * b_ / lam)
    r = w_k - target
    torch.testing.assert_close(ws[0].detach(), w_k, atol=1e-12, rtol=0)
    torch.testing.assert_close(d_w0, q @ (c ** K * (q.T @ r)), atol=1e-10, rtol=0)
    expected_lr = r @ (q @ (K * c ** (K - 1) * (b_ - lam * w0_)))
    torch.testing.assert_close(d_lr, expected_lr, atol=1e-10, rtol=0)


FD_CONFIGS = [
    ("Adam", {"lr": 0.05, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.05, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    ("RMSprop", {"lr": 0.02, "alpha": 0.9, "momentum": 0.5, "weight_decay": 0.1,
                 "centered": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.7, "nesterov": True, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("name,cfg", FD_CONFIGS, ids=[n for n, _ in FD_CONFIGS])
def test_derivatives_match_central_differences(name, cfg):
    """d loss(w_K) / d (w_0, every hyperparameter as a tensor), against gradcheck."""
    _, _, a, b, w0, target = quadratic(seed=1)
    anchor = torch.zeros_like(w0, requires_grad=True)
    opt = getattr(torch.optim, name)([anchor], **cfg)
    floats = {k: v for k, v in cfg.items() if isinstance(v, float)}
    if "betas" in cfg:
        floats.update(beta1=cfg["betas"][0], beta2=cfg["betas"][1])
    keys = list(floats)

    def final_loss(w0: torch.Tensor, *hyper: torch.Tensor) -> torch.Tensor:
        group = opt.param_groups[0]
        group.update({k: h for k, h in zip(keys, hyper) if not k.startswith("beta")})
        if "betas" in cfg:
            group["betas"] = (hyper[keys.index("beta1")], hyper[keys.index("beta2")])
        twin = functional_optimizer(opt, [anchor])
        ws, state = [w0], twin.init_state([w0])
        for _ in range(K):
            w = ws[0]
            loss = 0.5 * w @ a @ w - b @ w + torch.cos(w).sum()
            ws, state = twin.step(ws, torch.autograd.grad(loss, ws, create_graph=True), state)
        return 0.5 * (ws[0] - target).square().sum()

    inputs = (w0.requires_grad_(), *(torch.tensor(floats[k], dtype=torch.float64,
                                                  requires_grad=True) for k in keys))
    assert torch.autograd.gradcheck(final_loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=IDS)
def test_vmap_equals_loop(name, cfg, warm):
    params, opt = make(name, cfg)
    if warm:
        torch_steps(params, opt, gradients(1, 3))
    twin = functional_optimizer(opt, params)
    batch = 3
    starts = [torch.randn(batch, *s, dtype=torch.float64) for s in SHAPES]
    grads = gradients(2, batch=(batch,))
    initial = twin.init_state(params)  # unbatched, shared by every batch element

    def run(starts: list[torch.Tensor], grads: list[list[torch.Tensor]]):
        ws, state = list(starts), [dict(s) for s in initial]
        for step in grads:
            ws, state = twin.step(ws, step, state)
        return ws, state

    batched = torch.func.vmap(run)(starts, grads)
    for i in range(batch):
        one = run([s[i] for s in starts], [[g[i] for g in step] for step in grads])
        for x, y in zip(torch.utils._pytree.tree_leaves(batched),
                        torch.utils._pytree.tree_leaves(one)):
            torch.testing.assert_close(x[i] if x.dim() else x, y, atol=1e-12, rtol=0)


def test_other_optimizers_are_refused_with_the_alternatives():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(UnsupportedOptimizerError,
                       match=r"torch\.optim\.adagrad\.Adagrad .*SGD, Adam, AdamW, RMSprop.*"
                             r"grad='cg'"):
        functional_optimizer(torch.optim.Adagrad([w]), [w])

    # Another library's class of the same name (or a subclass) may do other maths in step().
    lookalike = type("SGD", (torch.optim.SGD,), {})
    with pytest.raises(UnsupportedOptimizerError, match=r"test_functional\.SGD has no"):
        functional_optimizer(lookalike([w], lr=0.1), [w])
    assert SUPPORTED == ("SGD", "Adam", "AdamW", "RMSprop")


def test_unknown_option_is_refused_by_name():
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([w], fused=True, foreach=False, capturable=True, differentiable=False)
    functional_optimizer(opt, [w])  # implementation flags are ignored
    opt.defaults["lookahead"] = 5  # as a future torch option might appear
    opt.param_groups[0]["lookahead"] = 5
    with pytest.raises(UnsupportedOptimizerError, match=r"option lookahead=5 \(param group 0\)"):
        functional_optimizer(opt, [w])


def test_parameter_outside_the_optimizer_and_complex_parameters_are_refused():
    w, stray = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ParameterNotInOptimizerError, match=r"parameter 1 \(shape \(3,\)\)"):
        functional_optimizer(torch.optim.SGD([w], lr=0.1), [w, stray])
    z = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(UnsupportedOptimizerError, match="complex"):
        functional_optimizer(torch.optim.SGD([z], lr=0.1), [z])


# The twin never calls optimizer.step(), which the scheduler would like to see first.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")
@pytest.mark.parametrize("name,cfg", [c for c in CONFIGS if c[1].get("momentum")][:2]
                         + [("Adam", {"lr": 0.01})], ids=["SGD", "SGD-damp", "Adam"])
def test_scheduler_changes_are_seen(name, cfg):
    reference, ref_opt = make(name, cfg)
    params, opt = make(name, cfg)
    grads = gradients(2)
    torch_steps(reference, ref_opt, grads, torch.optim.lr_scheduler.StepLR(ref_opt, 1, 0.5))
    ws, _ = twin_steps(params, opt, grads, torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))
    for w, r in zip(ws, reference):
        torch.testing.assert_close(w, r.detach(), atol=1e-12, rtol=0)
    assert opt.param_groups[0]["lr"] == cfg["lr"] * 0.5 ** K


@pytest.mark.parametrize("name,cfg", [CONFIGS[i] for i in (2, 8, 13)],
                         ids=[IDS[i] for i in (2, 8, 13)])
def test_write_back_lets_the_real_optimizer_continue(name, cfg):
    reference, ref_opt = make(name, cfg)
    params, opt = make(name, cfg)
    first, second = gradients(1), gradients(2)
    torch_steps(reference, ref_opt, first + second)
    ws, state = twin_steps(params, opt, first)
    with torch.no_grad():
        for p, w in zip(params, ws):
            p.copy_(w)
    functional_optimizer(opt, params).write_back(params, state)
    torch_steps(params, opt, second)
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.detach(), r.detach(), atol=1e-12, rtol=0)


def test_adamw_decays_decoupled_without_the_group_flag():
    """torch before 2.6 had no decoupled_weight_decay in AdamW's param groups."""
    cfg = {"lr": 0.01, "weight_decay": 0.5}
    reference, ref_opt = make("AdamW", cfg)
    params, opt = make("AdamW", cfg)
    for group in opt.param_groups:
        del group["decoupled_weight_decay"]
    grads = gradients(2)
    torch_steps(reference, ref_opt, grads)
    ws, _ = twin_steps(params, opt, grads)
    for w, r in zip(ws, reference):
        torch.testing.assert_close(w, r.detach(), atol=1e-12, rtol=0)


def test_tensor_hyperparameters_keep_their_terms_and_shapes():
    """A learnable weight decay at exactly zero still gets its derivative, -lr * w per step; a
    1-element lr does not broadcast a 0-d parameter to shape (1,)."""
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    decay = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    opt.param_groups[0].update(lr=torch.tensor([0.1], dtype=torch.float64), weight_decay=decay)
    (new,), _ = functional_optimizer(opt, [w]).step([w], [torch.zeros_like(w)], [{}])
    assert new.shape == ()
    (d_decay,) = torch.autograd.grad(new, decay)
    torch.testing.assert_close(d_decay, torch.tensor(-0.2, dtype=torch.float64))


def test_mismatched_lengths_are_refused():
    w = torch.zeros(2, requires_grad=True)
    twin = functional_optimizer(torch.optim.SGD([w], lr=0.1), [w])
    with pytest.raises(ValueError, match="expected 1 parameters"):
        twin.step([w, w], [w, w], [{}, {}])
