"""Unrolled differentiation: against closed forms and hand-written loops, MAML, truncation,
checkpointing, learnable optimizer hyperparameters, buffers."""

from __future__ import annotations

import math

import pytest
import torch

import mlodsl as ml
from mlodsl.errors import HypergradError, InvalidLevelError
from quadratic import DTYPE


def problem(seed=0, d=4, k=3):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    M = rand(d, d)
    A = M @ M.T / d + torch.eye(d, dtype=DTYPE)
    return A, rand(d, k), rand(d), rand(d), rand(k)


class Capture:
    def __init__(self):
        self.grads = []

    def on_hypergrad(self, *, program, level, step, grads, diagnostics):
        self.grads.append(grads[0].detach().clone())


class CaptureAll:
    """Every hypergradient, all of its tensors, into ``capture.grads``."""

    def __init__(self, capture):
        self.capture = capture

    def on_hypergrad(self, *, program, level, step, grads, diagnostics):
        self.capture.grads.append([g.detach().clone() for g in grads])


def unrolled_program(optimizer, K, method=None, seed=0):
    """lower: L(w; lam) = 1/2 w'Aw - w'B lam, trained by `optimizer`; upper: 1/2 |w - t|^2."""
    A, B, t, w0, lam0 = problem(seed)
    params = torch.nn.ParameterList([torch.nn.Parameter(w0.clone())])
    lam = torch.nn.Parameter(lam0.clone())
    capture = Capture()

    @ml.level(module=params, optimizer=optimizer([params[0]]))
    def low(up):
        w = params[0]
        return 0.5 * w @ A @ w - w @ (B @ up.module)

    @ml.level(upper_of="low", grad=method or ml.hypergrad.unroll(), module=lam, inner_steps=K,
              optimizer=torch.optim.SGD([lam], lr=0.0))
    def up(low):
        return 0.5 * (low.module[0] - t).pow(2).sum()

    program = ml.program(low, up, hooks=[capture], progress=False)
    return program, capture, (A, B, t, w0, lam0)


def test_unroll_matches_closed_form_of_k_sgd_steps():
    lr, K = 0.1, 4
    program, capture, (A, B, t, w0, lam0) = unrolled_program(
        lambda p: torch.optim.SGD(p, lr=lr), K)
    program.run(steps=K)
    step = torch.eye(4, dtype=DTYPE) - lr * A
    w = w0.clone()
    for _ in range(K):
        w = step @ w + lr * B @ lam0
    jacobian = sum(torch.linalg.matrix_power(step, j) for j in range(K)) @ (lr * B)
    expected = jacobian.T @ (w - t)
    assert torch.allclose(program.level("low").params[0], w, atol=1e-12)
    assert (capture.grads[0] - expected).norm() / expected.norm() <= 1e-10


def test_unroll_matches_closed_form_of_momentum_sgd():
    lr, mu, K = 0.05, 0.9, 5
    program, capture, (A, B, t, w0, lam0) = unrolled_program(
        lambda p: torch.optim.SGD(p, lr=lr, momentum=mu), K)
    program.run(steps=K)
    # Propagate the exact Jacobians of the linear recurrence: buffer b = mu b + g (b = g first).
    w, b = w0.clone(), None
    Jw, Jb = torch.zeros(4, 3, dtype=DTYPE), None
    for _ in range(K):
        g, Jg = A @ w - B @ lam0, A @ Jw - B
        b, Jb = (g, Jg) if b is None else (mu * b + g, mu * Jb + Jg)
        w, Jw = w - lr * b, Jw - lr * Jb
    expected = Jw.T @ (w - t)
    assert (capture.grads[0] - expected).norm() / expected.norm() <= 1e-10


def test_unrolled_adam_matches_autograd_through_a_hand_written_adam():
    lr, betas, eps, K = 0.05, (0.8, 0.95), 1e-8, 4
    program, capture, (A, B, t, w0, lam0) = unrolled_program(
        lambda p: torch.optim.Adam(p, lr=lr, betas=betas, eps=eps), K)
    program.run(steps=K)
    lam = lam0.clone().requires_grad_()
    w, m, v = w0.clone(), torch.zeros(4, dtype=DTYPE), torch.zeros(4, dtype=DTYPE)
    for k in range(1, K + 1):
        g = A @ w - B @ lam
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** k), v / (1 - betas[1] ** k)
        w = w - lr * m_hat / (v_hat.sqrt() + eps)
    (expected,) = torch.autograd.grad(0.5 * (w - t).pow(2).sum(), lam)
    assert (capture.grads[0] - expected).norm() / expected.norm() <= 1e-10


def test_truncated_unroll_differentiates_only_the_last_steps():
    lr, K = 0.1, 4
    program, capture, (A, B, t, w0, lam0) = unrolled_program(
        lambda p: torch.optim.SGD(p, lr=lr), K, method=ml.hypergrad.unroll(steps=1))
    program.run(steps=K)
    w = program.level("low").params[0].detach()
    expected = (lr * B).T @ (w - t)  # only the last step's dependence on lam
    assert (capture.grads[0] - expected).norm() / expected.norm() <= 1e-10


def test_checkpointed_unroll_gives_the_same_hypergradient():
    results = []
    for checkpoint in (False, True):
        program, capture, _ = unrolled_program(
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5), 6,
            method=ml.hypergrad.unroll(checkpoint=checkpoint))
        program.run(steps=12)
        results.append(torch.stack(capture.grads))
    assert torch.allclose(results[0], results[1], rtol=1e-12, atol=1e-14)


def graph_bytes(tensors):
    """Bytes of the distinct tensors saved in the autograd graph behind ``tensors``."""
    nodes, saved, stack = set(), {}, [t.grad_fn for t in tensors]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        values = []
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                values.extend(value if isinstance(value, (tuple, list)) else (value,))
        if hasattr(node, "saved_tensors"):  # a custom Function
            values.extend(node.saved_tensors)
        for t in values:
            if isinstance(t, torch.Tensor) and t.numel():
                saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(saved.values())


def test_checkpointed_unroll_keeps_only_the_weights_of_each_step():
    """What the autograd graph holds after K - 1 unrolled steps, before the upper level's update:
    with checkpoint=True each step's weights and the data, several times less than the
    activations and second-order graphs of plain unrolling."""
    K = 12
    held = {}
    for checkpoint in (False, True):
        torch.manual_seed(0)
        x, y = torch.randn(64, 8, dtype=DTYPE), torch.randn(64, 1, dtype=DTYPE)
        net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 1)).double()
        lam = torch.nn.Parameter(torch.tensor(-2.0, dtype=DTYPE))

        @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05))
        def fit(hpo):
            decay = sum(p.pow(2).sum() for p in net.parameters())
            return (net(x) - y).pow(2).mean() + hpo.exp() * decay

        @ml.level(upper_of="fit", grad=ml.hypergrad.unroll(checkpoint=checkpoint), module=lam,
                  inner_steps=K, optimizer=torch.optim.SGD([lam], lr=0.0))
        def hpo(fit):
            return (fit(x) - y).pow(2).mean()

        program = ml.program(fit, hpo, progress=False)
        program.run(steps=K - 1)
        held[checkpoint] = graph_bytes(program._runtime.unroller.fast["fit"])
    weights = sum(p.numel() for p in net.parameters()) * 8
    assert held[True] <= K * weights + x.numel() * 8 + 1024, held
    assert held[False] > 4 * held[True], held


def test_second_cycle_starts_from_where_the_lower_level_is():
    lr, K = 0.1, 2
    program, capture, (A, B, t, w0, lam0) = unrolled_program(
        lambda p: torch.optim.SGD(p, lr=lr), K)
    program.run(steps=2 * K)
    assert len(capture.grads) == 2
    assert program.history.series("up", "up->low/unrolled_steps") == [K, K]
    step = torch.eye(4, dtype=DTYPE) - lr * A
    w = w0.clone()
    for _ in range(2 * K):
        w = step @ w + lr * B @ lam0  # the upper's lr is 0: lam never moves
    jacobian = sum(torch.linalg.matrix_power(step, j) for j in range(K)) @ (lr * B)
    expected = jacobian.T @ (w - t)  # differentiated through this cycle's K steps only
    assert (capture.grads[1] - expected).norm() / expected.norm() <= 1e-10


def maml_program(first_order=False, inner_lr=0.3):
    """Meta-parameters theta; one inner SGD step on a support quadratic; query quadratic."""
    gen = torch.Generator().manual_seed(3)
    S = torch.randn(3, 3, generator=gen, dtype=DTYPE)
    S = S @ S.T / 3 + torch.eye(3, dtype=DTYPE)
    Q = torch.randn(3, 3, generator=gen, dtype=DTYPE)
    Q = Q @ Q.T / 3 + torch.eye(3, dtype=DTYPE)
    s, q = torch.randn(3, generator=gen, dtype=DTYPE), torch.randn(3, generator=gen, dtype=DTYPE)
    meta_net = torch.nn.Linear(3, 1, bias=False).double()
    learner_net = torch.nn.Linear(3, 1, bias=False).double()
    theta0 = meta_net.weight.detach()[0].clone()
    capture = Capture()

    @ml.level(module=learner_net, optimizer=torch.optim.SGD(learner_net.parameters(),
                                                            lr=inner_lr),
              init_from="meta")
    def learner():
        phi = learner_net.weight[0]
        return 0.5 * (phi - s) @ S @ (phi - s)

    @ml.level(upper_of="learner", grad=ml.hypergrad.unroll(first_order=first_order),
              module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(), lr=0.0))
    def meta(learner):
        phi = learner.weight[0]
        return 0.5 * (phi - q) @ Q @ (phi - q)

    program = ml.program(learner, meta, hooks=[capture], progress=False)
    return program, capture, (S, Q, s, q, theta0, inner_lr)


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_restarts_from_the_meta_parameters(first_order):
    program, capture, (S, Q, s, q, theta, lr) = maml_program(first_order)
    program.run(steps=1)
    phi = theta - lr * S @ (theta - s)
    query_grad = Q @ (phi - q)
    expected = query_grad if first_order else (torch.eye(3, dtype=DTYPE) - lr * S) @ query_grad
    assert (capture.grads[0].reshape(-1) - expected).norm() / expected.norm() <= 1e-10
    program.run(steps=1)  # the learner restarts from theta (unchanged: meta lr is 0)
    assert torch.allclose(capture.grads[1], capture.grads[0], atol=1e-14)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_learnable_inner_learning_rate(checkpoint):
    """The upper level owns the lower optimizer's lr (a tensor in its param group)."""
    A, B, t, w0, lam0 = problem()
    w = torch.nn.ParameterList([torch.nn.Parameter(w0.clone())])
    log_lr = torch.nn.Parameter(torch.tensor(-2.0, dtype=DTYPE))
    inner = torch.optim.SGD([w[0]], lr=0.1)
    capture = Capture()

    @ml.level(module=w, optimizer=inner)
    def low():
        inner.param_groups[0]["lr"] = lr_level_value()
        return 0.5 * w[0] @ A @ w[0] - w[0] @ (B @ lam0)

    def lr_level_value():
        return log_lr.exp()

    @ml.level(upper_of="low", grad=ml.hypergrad.unroll(checkpoint=checkpoint), module=log_lr,
              optimizer=torch.optim.SGD([log_lr], lr=0.0))
    def schedule(low):
        return 0.5 * (low.module[0] - t).pow(2).sum()

    ml.program(low, schedule, hooks=[capture], progress=False).run(steps=1)
    lr = float(log_lr.detach().exp())
    g0 = A @ w0 - B @ lam0
    w1 = w0 - lr * g0
    expected = -(w1 - t) @ g0 * lr  # dF/dlog_lr = dF/dlr * lr
    assert abs(float(capture.grads[0]) - float(expected)) <= 1e-10 * abs(float(expected))


def test_batchnorm_statistics_update_during_unrolled_steps_and_stay_out_of_gradients():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, dtype=DTYPE), torch.randn(32, 1, dtype=DTYPE)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                              torch.nn.Linear(4, 1)).double()
    log_decay = torch.nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    def fit(hpo):
        return (net(x) - y).pow(2).mean() + hpo.exp() * net[0].weight.pow(2).sum()

    @ml.level(upper_of="fit", grad="unroll", module=log_decay, inner_steps=3,
              optimizer=torch.optim.SGD([log_decay], lr=0.1))
    def hpo(fit):
        return (fit(x) - y).pow(2).mean()

    before = net[1].running_mean.clone()
    program = ml.program(fit, hpo, progress=False)
    program.run(steps=3)
    assert not torch.equal(net[1].running_mean, before)
    assert int(net[1].num_batches_tracked) >= 3
    assert all(p.requires_grad for p in program.level("fit").params)
    assert len(program.level("fit").params) == 6  # weights and biases only, no buffers
    assert log_decay.item() != -1.0


def test_unroll_needs_a_module_for_the_lower_level():
    w = torch.nn.Parameter(torch.zeros(2))
    lam = torch.nn.Parameter(torch.zeros(2))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def low(up):
        return (w - up.module).pow(2).sum()

    @ml.level(upper_of="low", grad="unroll", module=lam, optimizer=torch.optim.SGD([lam], lr=0.1))
    def up(low):
        return low.module.sum()

    with pytest.raises(HypergradError, match=r"'low'.*unrolled by 'up'.*nn.Module"):
        ml.program(low, up).run(steps=1)


def test_init_from_must_be_the_unrolling_upper_with_the_same_shapes():
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(3, 1)

    @ml.level(module=a, optimizer=torch.optim.SGD(a.parameters(), lr=0.1), init_from="meta")
    def learner():
        return a.weight.sum()

    @ml.level(upper_of="learner", grad="unroll", module=b,
              optimizer=torch.optim.SGD(b.parameters(), lr=0.1))
    def meta(learner):
        return learner.weight.sum()

    with pytest.raises(InvalidLevelError, match=r"init_from='meta', but their parameters differ"):
        ml.program(learner, meta)


def task_batch_program(first_order=False, inner_lr=0.1, tasks=4, inner_steps=1, momentum=0.0):
    torch.manual_seed(0)

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(),
                                   torch.nn.Linear(8, 1)).double()

    meta_net, learner_net = mlp(), mlp()
    gen = torch.Generator().manual_seed(1)
    support = (torch.randn(tasks, 5, 1, generator=gen, dtype=DTYPE),
               torch.randn(tasks, 5, 1, generator=gen, dtype=DTYPE))
    query = (torch.randn(tasks, 6, 1, generator=gen, dtype=DTYPE),
             torch.randn(tasks, 6, 1, generator=gen, dtype=DTYPE))
    capture = Capture()

    @ml.level(module=learner_net, optimizer=torch.optim.SGD(learner_net.parameters(),
                                                            lr=inner_lr, momentum=momentum),
              data=lambda: support, init_from="meta", tasks=True)
    def learner(batch):
        x, y = batch
        return (learner_net(x) - y).pow(2).mean()

    @ml.level(upper_of="learner", grad=ml.hypergrad.unroll(first_order=first_order),
              inner_steps=inner_steps, module=meta_net, data=lambda: query,
              optimizer=torch.optim.SGD(meta_net.parameters(), lr=0.0))
    def meta(batch, learner):
        x, y = batch
        return (learner(x) - y).pow(2).mean()

    program = ml.program(learner, meta, hooks=[CaptureAll(capture)], progress=False)
    return program, capture, meta_net, support, query


@pytest.mark.parametrize("first_order,inner_steps,momentum",
                         [(False, 1, 0.0), (True, 1, 0.0), (False, 2, 0.0), (False, 3, 0.9)])
def test_task_batch_adapts_in_parallel_and_equals_a_task_loop(first_order, inner_steps,
                                                              momentum):
    program, capture, meta_net, support, query = task_batch_program(
        first_order, inner_steps=inner_steps, momentum=momentum)
    program.run(steps=inner_steps)
    theta = list(meta_net.parameters())
    names = [n for n, _ in meta_net.named_parameters()]
    total = [torch.zeros_like(p) for p in theta]
    for i in range(support[0].shape[0]):
        phi, buffers = list(theta), None
        for _ in range(inner_steps):
            out = torch.func.functional_call(meta_net, dict(zip(names, phi)), (support[0][i],))
            grads = torch.autograd.grad((out - support[1][i]).pow(2).mean(), phi,
                                        create_graph=not first_order)
            buffers = (grads if buffers is None  # torch's momentum buffer starts at g
                       else [momentum * b + g for b, g in zip(buffers, grads)])
            phi = [p - 0.1 * b for p, b in zip(phi, buffers)]
        out = torch.func.functional_call(meta_net, dict(zip(names, phi)), (query[0][i],))
        meta_grads = torch.autograd.grad((out - query[1][i]).pow(2).mean(), theta)
        total = [t + g / support[0].shape[0] for t, g in zip(total, meta_grads)]
    for ours, expected in zip(capture.grads[0], total):
        assert torch.allclose(ours, expected, rtol=1e-10, atol=1e-12)


def test_task_batch_needs_init_from():
    net = torch.nn.Linear(1, 1)

    with pytest.raises(InvalidLevelError, match=r"tasks=True.*needs init_from"):
        @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), tasks=True)
        def learner():
            return net.weight.sum()

        other = torch.nn.Linear(1, 1)

        @ml.level(upper_of="learner", grad="unroll", module=other,
                  optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
        def meta(learner):
            return learner.weight.sum()

        ml.program(learner, meta)


def test_loading_a_checkpoint_restarts_unrolled_trajectories_from_the_loaded_weights(tmp_path):
    program, capture, _ = unrolled_program(lambda p: torch.optim.SGD(p, lr=0.1), 2)
    program.run(steps=2)
    program.save(tmp_path / "two.pt")
    program.run(steps=2)
    program.load(tmp_path / "two.pt")
    program.run(steps=2)
    assert torch.allclose(capture.grads[2], capture.grads[1], rtol=1e-12, atol=1e-14)


def test_check_hypergrad_compares_unroll_with_the_implicit_answer():
    """Many SGD steps on a strongly convex lower level: unrolling approaches the implicit
    (exact) hypergradient at the point it reached."""
    program, _, _ = unrolled_program(lambda p: torch.optim.SGD(p, lr=0.3), 60)
    program.run(steps=60)  # one full cycle, the upper took its step (its lr is 0)
    program.run(steps=59)  # the next trajectory, one step short of the next upper update
    report = ml.check_hypergrad(program, "up", reference="exact")
    assert report.method == "unroll" and report.relative_error < 1e-6


def three_linear_levels(grad_top, grad_mid, top_reads_low=False, tasks=False):
    """top -> mid -> low on 1x1 Linear modules."""
    lows = [torch.nn.Linear(1, 1) for _ in range(3)]

    @ml.level(module=lows[0], optimizer=torch.optim.SGD(lows[0].parameters(), lr=0.1),
              tasks=tasks, init_from="mid" if tasks else None)
    def low(mid):
        return (lows[0].weight * mid.weight).sum() + sum(p.pow(2).sum()
                                                         for p in lows[0].parameters())

    @ml.level(upper_of="low", grad=grad_mid, module=lows[1],
              optimizer=torch.optim.SGD(lows[1].parameters(), lr=0.1))
    def mid(low, top):
        own = lows[1].weight
        return ((low.weight + top.weight) * own).sum() + sum(p.pow(2).sum()
                                                             for p in lows[1].parameters())

    @ml.level(upper_of="mid", grad=grad_top, module=lows[2],
              optimizer=torch.optim.SGD(lows[2].parameters(), lr=0.1))
    def top(mid, low):
        return mid.weight.sum() + low.weight.sum()

    @ml.level(upper_of="mid", grad=grad_top, module=lows[2], name="top",
              optimizer=torch.optim.SGD(lows[2].parameters(), lr=0.1))
    def top_reads_mid(mid):
        return mid.weight.sum()

    return ml.program(low, mid, top if top_reads_low else top_reads_mid)


@pytest.mark.parametrize("grad_top,grad_mid,options,match", [
    # top's edge-by-edge chain rule would need d low*/d mid from an unrolled edge
    ("cg", "unroll", {"top_reads_low": True},
     r"'top'.*grad='cg'.*reads 'low', which 'mid' unrolls.*grad='unroll' on 'top'"),
    # differentiating through mid's implicit hypergradient is not supported
    ("unroll", "cg", {}, r"'top'.*unrolls 'mid'.*'mid' computes its own hypergradient through "
                         r"'low' with grad='cg'.*grad='unroll' on 'mid' too"),
    (ml.hypergrad.unroll(checkpoint=True), "unroll", {},
     r"'top'.*unrolls 'mid', which unrolls 'low'.*'top' asks for checkpoint=True"),
    ("unroll", ml.hypergrad.unroll(checkpoint=True), {}, r"'mid' asks for checkpoint=True"),
    ("unroll", "unroll", {"tasks": True}, r"nested unrolling.*tasks=True on 'low'"),
])
def test_unsupported_unrolling_at_depth_is_refused(grad_top, grad_mid, options, match):
    with pytest.raises(InvalidLevelError, match=match):
        three_linear_levels(grad_top, grad_mid, **options)


@pytest.mark.parametrize("grad_top", ["unroll", "exact", "cg"])
def test_a_level_that_unrolls_may_have_an_upper(grad_top):
    """Nested unrolling, or a joint method, or an edge method that does not read low."""
    program = three_linear_levels(grad_top, "unroll", top_reads_low=grad_top != "cg")
    program.run(steps=2)
    assert program.steps["top"] == 2


def test_imaml_restart_with_an_implicit_method():
    """init_from with grad='exact' and a proximal term: the learner restarts from the meta
    weights after each meta step, and the meta-gradient is lam (S + lam I)^{-1} Q (phi* - q)."""
    gen = torch.Generator().manual_seed(4)
    S = torch.randn(3, 3, generator=gen, dtype=DTYPE)
    S = S @ S.T / 3 + torch.eye(3, dtype=DTYPE)
    Q = torch.eye(3, dtype=DTYPE) * 2
    s, q = torch.randn(3, generator=gen, dtype=DTYPE), torch.randn(3, generator=gen, dtype=DTYPE)
    lam = 0.5
    meta_net = torch.nn.Linear(3, 1, bias=False).double()
    learner_net = torch.nn.Linear(3, 1, bias=False).double()
    theta = meta_net.weight.detach()[0].clone()
    capture = Capture()

    @ml.level(module=learner_net, init_from="meta",
              optimizer=torch.optim.SGD(learner_net.parameters(), lr=0.2))
    def learner(meta):
        phi = learner_net.weight[0]
        return 0.5 * (phi - s) @ S @ (phi - s) + 0.5 * lam * (phi - meta.weight[0]).pow(2).sum()

    @ml.level(upper_of="learner", grad="exact", module=meta_net, inner_steps=300,
              optimizer=torch.optim.SGD(meta_net.parameters(), lr=0.0))
    def meta(learner):
        phi = learner.weight[0]
        return 0.5 * (phi - q) @ Q @ (phi - q)

    program = ml.program(learner, meta, hooks=[capture], progress=False)
    assert not torch.equal(learner_net.weight.detach()[0], theta)
    assert program.steps["program"] == 0  # starting the runtime restarts the learner from theta
    assert torch.equal(learner_net.weight.detach()[0], theta)
    program.run(steps=300)
    shifted = S + lam * torch.eye(3, dtype=DTYPE)
    phi_star = torch.linalg.solve(shifted, S @ s + lam * theta)
    expected = lam * torch.linalg.solve(shifted, Q @ (phi_star - q))
    assert (capture.grads[0].reshape(-1) - expected).norm() / expected.norm() <= 1e-8
    assert torch.equal(learner_net.weight.detach()[0], theta)  # restarted after the meta step


def test_maml_learner_reading_the_meta_parameters_differentiates_only_its_own():
    """The learner starts an episode on the meta tensors themselves, and its loss also reads
    them (M theta): its inner gradient is w.r.t. phi at fixed theta, S(phi - s) + M theta, not
    the total derivative along phi = theta (which would add M' theta)."""
    gen = torch.Generator().manual_seed(6)
    S = torch.randn(3, 3, generator=gen, dtype=DTYPE)
    S = S @ S.T / 3 + torch.eye(3, dtype=DTYPE)
    M = torch.randn(3, 3, generator=gen, dtype=DTYPE)
    s, q = torch.randn(3, generator=gen, dtype=DTYPE), torch.randn(3, generator=gen, dtype=DTYPE)
    meta_net = torch.nn.Linear(3, 1, bias=False).double()
    learner_net = torch.nn.Linear(3, 1, bias=False).double()
    theta, lr = meta_net.weight.detach()[0].clone(), 0.2
    capture = Capture()

    @ml.level(module=learner_net, init_from="meta",
              optimizer=torch.optim.SGD(learner_net.parameters(), lr=lr))
    def learner(meta):
        phi = learner_net.weight[0]
        return 0.5 * (phi - s) @ S @ (phi - s) + phi @ (M @ meta.weight[0])

    @ml.level(upper_of="learner", grad="unroll", module=meta_net,
              optimizer=torch.optim.SGD(meta_net.parameters(), lr=0.0))
    def meta(learner):
        return 0.5 * (learner.weight[0] - q).pow(2).sum()

    ml.program(learner, meta, hooks=[capture], progress=False).run(steps=1)
    phi = theta - lr * (S @ (theta - s) + M @ theta)
    expected = (torch.eye(3, dtype=DTYPE) - lr * (S + M)).T @ (phi - q)
    assert torch.allclose(learner_net.weight.detach()[0], phi, atol=1e-14)
    assert (capture.grads[0].reshape(-1) - expected).norm() / expected.norm() <= 1e-10


def test_accumulation_and_mid_cycle_inspection_keep_the_trajectory():
    """An unrolling level with accumulate=2 backpropagates twice through one trajectory, and
    program.hypergrad mid-cycle must not free it: both give the plain run's hypergradient."""
    A, B, t, w0, lam0 = problem(0)
    results = []
    for accumulate, inspect in ((1, False), (2, False), (1, True)):
        params = torch.nn.ParameterList([torch.nn.Parameter(w0.clone())])
        lam = torch.nn.Parameter(lam0.clone())
        capture = Capture()

        @ml.level(module=params, optimizer=torch.optim.SGD([params[0]], lr=0.1))
        def low(up):
            return 0.5 * params[0] @ A @ params[0] - params[0] @ (B @ up.module)

        @ml.level(upper_of="low", grad="unroll", module=lam, inner_steps=3,
                  accumulate=accumulate, optimizer=torch.optim.SGD([lam], lr=0.1))
        def up(low):
            return 0.5 * (low.module[0] - t).pow(2).sum()

        program = ml.program(low, up, hooks=[capture], progress=False)
        program.run(steps=4)
        if inspect:
            program.hypergrad("up")
        program.run(steps=2)
        results.append(torch.stack(capture.grads))
    assert results[0].shape == (2, 3)
    assert torch.allclose(results[1], results[0], rtol=1e-12, atol=0)
    assert torch.allclose(results[2], results[0], rtol=1e-12, atol=0)


def test_implicit_upper_beside_an_unrolling_one():
    """'low' below two uppers: 'left' unrolls it, 'right' differentiates it implicitly. cg
    (3 iterations on a 3-parameter quadratic) must give what exact gives, on leaf copies of
    low's current weights."""
    norms = []
    for grad_right in (ml.hypergrad.cg(iterations=3, tol=0.0), "exact"):
        w = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(3, dtype=DTYPE))])
        left_p = torch.nn.Parameter(torch.zeros(3, dtype=DTYPE))
        right_p = torch.nn.Parameter(torch.zeros(3, dtype=DTYPE))

        @ml.level(module=w, optimizer=torch.optim.SGD(w.parameters(), lr=0.1))
        def low(left, right):
            return (0.5 * (w[0] - left.module - right.module).pow(2).sum()
                    + 0.05 * w[0].pow(2).sum())

        @ml.level(upper_of="low", grad="unroll", inner_steps=2, module=left_p,
                  optimizer=torch.optim.SGD([left_p], lr=0.1))
        def left(low):
            return 0.5 * (low.module[0] - 1).pow(2).sum()

        @ml.level(upper_of="low", grad=grad_right, inner_steps=2, module=right_p,
                  optimizer=torch.optim.SGD([right_p], lr=0.1))
        def right(low):
            return 0.5 * (low.module[0] - 3).pow(2).sum()

        program = ml.program(low, left, right, progress=False)
        program.run(steps=6)
        norms.append(torch.tensor(program.history.series("right", "hypergrad_norm")))
    assert norms[0].shape == (3,) and bool((norms[0] > 0).all())
    assert torch.allclose(norms[0], norms[1], rtol=1e-10, atol=0)


def imaml_program(support, query, theta, tasks, cg_iterations, inner_steps, meta_lr=0.0):
    """iMAML on regression tasks: the learner takes `inner_steps` SGD steps on its support loss
    plus lam/2 |phi - theta|^2 from theta; the meta level's hypergradient is per-task CG."""
    lam = 0.7
    meta_net = tiny_net(theta)
    learner_net = tiny_net(theta)
    capture = Capture()

    @ml.level(module=learner_net, init_from="meta", tasks=tasks, data=lambda: support,
              optimizer=torch.optim.SGD(learner_net.parameters(), lr=0.2))
    def learner(batch, meta):
        x, y = batch
        prox = sum((p - q).pow(2).sum() for p, q in zip(learner_net.parameters(),
                                                        meta.parameters()))
        return (learner_net(x) - y).pow(2).mean() + 0.5 * lam * prox

    @ml.level(upper_of="learner", grad=ml.hypergrad.cg(iterations=cg_iterations, tol=0.0),
              inner_steps=inner_steps, module=meta_net, data=lambda: query,
              optimizer=torch.optim.SGD(meta_net.parameters(), lr=meta_lr))
    def meta(batch, learner):
        x, y = batch
        return (learner(x) - y).pow(2).mean()

    program = ml.program(learner, meta, hooks=[CaptureAll(capture)], progress=False)
    return program, capture, meta_net, learner_net


def tiny_net(values=None):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 1)).double()
    if values is not None:
        with torch.no_grad():
            for p, v in zip(net.parameters(), values):
                p.copy_(v)
    return net


@pytest.mark.parametrize("cg_iterations", [2, 30])
def test_imaml_task_batch_equals_a_task_loop(cg_iterations):
    """tasks=True under grad='cg': the vmapped adaptation and the per-task CG give, at every
    meta step, the mean of what separate one-task programs give (also with CG cut short at 2
    iterations, where one CG over all tasks would differ)."""
    gen = torch.Generator().manual_seed(5)
    tasks, inner = 4, 3
    support = (torch.randn(tasks, 6, 1, generator=gen, dtype=DTYPE),
               torch.randn(tasks, 6, 1, generator=gen, dtype=DTYPE))
    query = (torch.randn(tasks, 5, 1, generator=gen, dtype=DTYPE),
             torch.randn(tasks, 5, 1, generator=gen, dtype=DTYPE))
    start = [p.detach().clone() for p in tiny_net().parameters()]
    program, capture, meta_net, _ = imaml_program(support, query, start, True, cg_iterations,
                                                  inner, meta_lr=0.5)
    thetas = []
    for _ in range(2):  # two meta steps: the second starts from moved meta weights
        thetas.append([p.detach().clone() for p in meta_net.parameters()])
        program.run(steps=inner)
    assert len(capture.grads) == 2
    assert not torch.equal(thetas[0][0], thetas[1][0])
    for theta, ours in zip(thetas, capture.grads):
        expected = [torch.zeros_like(t) for t in theta]
        for i in range(tasks):
            one = (support[0][i], support[1][i]), (query[0][i], query[1][i])
            single, got, _, _ = imaml_program(*one, theta, False, cg_iterations, inner)
            single.run(steps=inner)
            expected = [e + g / tasks for e, g in zip(expected, got.grads[0])]
        for a, b in zip(ours, expected):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), (a - b).abs().max()


def test_imaml_task_batch_history_and_restart():
    gen = torch.Generator().manual_seed(6)
    data = tuple(torch.randn(3, 4, 1, generator=gen, dtype=DTYPE) for _ in range(4))
    start = [p.detach().clone() for p in tiny_net().parameters()]
    program, _, meta_net, _ = imaml_program(data[:2], data[2:], start, True, 5, 2,
                                                      meta_lr=0.1)
    history = program.run(steps=4)
    assert len(history.series("learner", "loss")) == 4
    assert history.series("meta", "meta->learner/iterations")[-1] == 5
    assert not torch.equal(meta_net[0].weight, start[0])  # the meta weights moved


def test_task_batch_refuses_sama():
    net, other = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), tasks=True,
              init_from="meta")
    def learner(meta):
        return (net.weight - meta.weight).pow(2).sum()

    @ml.level(upper_of="learner", grad="sama", module=other,
              optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    def meta(learner):
        return learner.weight.sum()

    with pytest.raises(InvalidLevelError, match=r"tasks=True.*other than 'sama'"):
        ml.program(learner, meta)


def test_block_conjugate_gradient_solves_each_block_alone():
    """Per-block CG equals scalar CG on each block, including a block with negative curvature
    (left at zero) and a block whose operator returns NaN (left at zero, others unharmed)."""
    from mlodsl.hypergrad import blocks, kernels

    gen = torch.Generator().manual_seed(2)
    tasks, sizes = 3, (4, 2)
    mats = []
    for i in range(tasks):
        m = torch.randn(6, 6, generator=gen, dtype=DTYPE)
        mats.append(m @ m.T + torch.eye(6, dtype=DTYPE) if i != 1 else -torch.eye(6, dtype=DTYPE))
    stacked = [torch.zeros(tasks, s, dtype=DTYPE) for s in sizes]
    layout = blocks.layout(stacked)

    def split(v):  # flat (param-major) -> per task (6,)
        a, b = v[:tasks * 4].view(tasks, 4), v[tasks * 4:].view(tasks, 2)
        return torch.cat([a, b], 1)

    def join(per_task):
        return torch.cat([per_task[:, :4].reshape(-1), per_task[:, 4:].reshape(-1)])

    def matvec(v, poison=False):
        out = torch.stack([mats[i] @ row for i, row in enumerate(split(v))])
        if poison:
            out[2] = float("nan")
        return join(out)

    b = join(torch.randn(tasks, 6, generator=gen, dtype=DTYPE))
    x, _, _, unsolved = blocks.conjugate_gradient(matvec, b, layout, 3, 0.0)
    for i in range(tasks):
        alone, _, _ = kernels.conjugate_gradient(lambda v: mats[i] @ v, split(b)[i], None, 3, 0.0)
        assert torch.allclose(split(x)[i], alone, rtol=1e-12, atol=1e-14)
    assert unsolved == 1 and torch.equal(split(x)[1], torch.zeros(6, dtype=DTYPE))
    x, _, _, unsolved = blocks.conjugate_gradient(lambda v: matvec(v, True), b, layout, 3, 0.0)
    assert unsolved == 2 and torch.isfinite(x).all()
    assert torch.equal(split(x)[2], torch.zeros(6, dtype=DTYPE))
    alone, _, _ = kernels.conjugate_gradient(lambda v: mats[0] @ v, split(b)[0], None, 3, 0.0)
    assert torch.allclose(split(x)[0], alone, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("grad", ["unroll", "cg"])
def test_a_skipped_meta_step_restarts_the_tasks(grad):
    """on_nonfinite='skip': a meta-batch whose adaptation blows up is skipped, and the next one
    starts afresh from the meta weights (not from the broken per-task weights)."""
    torch.manual_seed(0)
    meta_net = torch.nn.Linear(1, 1).double()
    learner_net = torch.nn.Linear(1, 1).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 1, generator=gen, dtype=DTYPE)
    calls = []

    def support():
        calls.append(1)
        y = torch.full_like(x, float("inf")) if len(calls) == 2 else x * 2
        return x, y

    @ml.level(module=learner_net, init_from="meta", tasks=True, data=support,
              optimizer=torch.optim.SGD(learner_net.parameters(), lr=0.1))
    def learner(batch, meta):
        xs, ys = batch
        prox = sum((p - q).pow(2).sum() for p, q in zip(learner_net.parameters(),
                                                        meta.parameters()))
        return (learner_net(xs) - ys).pow(2).mean() + 0.5 * prox

    @ml.level(upper_of="learner", grad=grad, module=meta_net, data=lambda: (x, x * 2),
              optimizer=torch.optim.SGD(meta_net.parameters(), lr=0.1))
    def meta(batch, learner):
        xs, ys = batch
        return (learner(xs) - ys).pow(2).mean()

    history = ml.program(learner, meta, on_nonfinite="skip", progress=False).run(steps=3)
    assert [r.get("skipped", 0) for r in history["meta"]] == [0, 1, 0]
    assert math.isfinite(history["meta"][2]["hypergrad_norm"])
    assert all(torch.isfinite(p).all() for p in meta_net.parameters())


def test_implicit_task_batches_are_refused_under_data_parallelism():
    """Under data parallelism the kernels average every product over the ranks, which would
    mix different tasks' blocks when each rank holds other tasks: refused with the way out."""
    from mlodsl import consistency

    gen = torch.Generator().manual_seed(5)
    batch = tuple(torch.randn(2, 3, 1, generator=gen, dtype=DTYPE) for _ in range(2))
    start = [p.detach().clone() for p in tiny_net().parameters()]
    program, *_ = imaml_program(batch, batch, start, True, 2, 1)
    with pytest.raises(ml.errors.DistributedError, match="level 'learner' .*tasks=True.* below "
                       "'meta'.*grad='unroll' on the upper level"):
        consistency.check_supported(program._graph)


class TiedNet(torch.nn.Module):
    """Encoder and decoder share one weight matrix (registered under two names)."""

    def __init__(self):
        super().__init__()
        self.encode = torch.nn.Linear(3, 3)
        self.decode = torch.nn.Linear(3, 3)
        self.decode.weight = self.encode.weight

    def forward(self, x):
        return self.decode(torch.tanh(self.encode(x)))


@pytest.mark.parametrize("tasks", [False, True])
def test_tied_weights_take_the_fast_weights_under_every_name(tasks):
    """The unroller swaps parameters without functional_call's per-call search for tied
    weights; a tied parameter must still read its fast weights under both names."""
    torch.manual_seed(0)
    meta_net, learner_net = TiedNet().double(), TiedNet().double()
    gen = torch.Generator().manual_seed(2)
    shape = (2, 4, 3) if tasks else (4, 3)
    xs, ys, xq, yq = (torch.randn(*shape, generator=gen, dtype=DTYPE) for _ in range(4))
    capture = Capture()

    @ml.level(module=learner_net, optimizer=torch.optim.SGD(learner_net.parameters(), lr=0.3),
              data=lambda: (xs, ys), init_from="meta", tasks=tasks)
    def learner(batch):
        x, y = batch
        return (learner_net(x) - y).pow(2).mean()

    @ml.level(upper_of="learner", grad="unroll", inner_steps=1, module=meta_net,
              data=lambda: (xq, yq), optimizer=torch.optim.SGD(meta_net.parameters(), lr=0.0))
    def meta(batch, learner):
        x, y = batch
        return (learner(x) - y).pow(2).mean()

    ml.program(learner, meta, hooks=[capture], progress=False).run(steps=1)

    theta = list(meta_net.parameters())  # encode.weight (shared), encode.bias, decode.bias
    names = [n for n, _ in meta_net.named_parameters()]

    def query_loss(x_s, y_s, x_q, y_q):
        def loss(params, x, y):  # functional_call's default tie_weights=True handles the tie
            return (torch.func.functional_call(meta_net, dict(zip(names, params)), (x,))
                    - y).pow(2).mean()
        grads = torch.autograd.grad(loss(theta, x_s, y_s), theta, create_graph=True)
        return loss([p - 0.3 * g for p, g in zip(theta, grads)], x_q, y_q)

    if tasks:
        total = sum(query_loss(xs[i], ys[i], xq[i], yq[i]) for i in range(2)) / 2
    else:
        total = query_loss(xs, ys, xq, yq)
    expected = torch.autograd.grad(total, theta)
    assert len(theta) == 3  # encode.weight (= decode.weight), encode.bias, decode.bias
    assert torch.allclose(capture.grads[0], expected[0], rtol=1e-10, atol=1e-12)
