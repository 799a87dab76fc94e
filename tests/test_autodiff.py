"""Direct autograd-engine calls (mlodsl.autodiff): same results and errors as torch.autograd."""

from __future__ import annotations

import pytest
import torch

import mlodsl as ml
from mlodsl import autodiff


@pytest.fixture(autouse=True)
def engine_on():
    previous = autodiff.use_engine(True)
    yield
    autodiff.use_engine(previous)


def small_graph():
    torch.manual_seed(0)
    w = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    x = torch.randn(7, 5)
    unused = torch.randn(2, requires_grad=True)
    loss = torch.tanh(x @ w[0] + w[1]).pow(2).sum()
    return w, unused, loss


@pytest.fixture
def public_grad_forbidden(monkeypatch):
    """Make the public functions fail, so a passing call proves the engine path ran."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.autograd.grad was called")
    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)


def test_engine_is_used_on_this_torch():
    assert autodiff.engine_in_use()


def test_grad_equals_torch_autograd_grad():
    w, unused, loss = small_graph()
    public = torch.autograd.grad(loss, [*w, unused], retain_graph=True, allow_unused=True)
    fast = autodiff.grad(loss, [*w, unused], retain_graph=True, allow_unused=True)
    assert fast[2] is None and public[2] is None
    for a, b in zip(fast[:2], public[:2]):
        assert torch.equal(a, b)


def test_create_graph_and_hessian_vector_products_equal_public():
    w, _, loss = small_graph()
    g_fast = torch.cat([t.reshape(-1) for t in autodiff.grad(loss, w, create_graph=True)])
    g_public = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, w, create_graph=True)])
    assert torch.equal(g_fast, g_public) and g_fast.requires_grad
    v = torch.randn_like(g_fast)
    hv_fast = autodiff.grad(g_fast, w, grad_outputs=v, retain_graph=True)
    hv_public = torch.autograd.grad(g_public, w, grad_outputs=v, retain_graph=True)
    for a, b in zip(hv_fast, hv_public):
        assert torch.equal(a, b)


def test_engine_path_does_not_call_the_public_function(public_grad_forbidden):
    w, _, loss = small_graph()
    grads = autodiff.grad(loss, w, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    hv = autodiff.grad(flat, w, grad_outputs=torch.ones_like(flat), retain_graph=True)
    assert all(h.shape == p.shape for h, p in zip(hv, w))
    autodiff.backward(loss, w)
    assert all(p.grad is not None for p in w)


def test_graph_freed_without_retain_like_public():
    w, _, loss = small_graph()
    autodiff.grad(loss, w)  # retain_graph defaults to create_graph=False: graph freed
    with pytest.raises(RuntimeError, match="second time"):
        autodiff.grad(loss, w)


def test_unused_input_error_when_not_allowed():
    w, unused, loss = small_graph()
    with pytest.raises(RuntimeError, match="not have been used"):
        autodiff.grad(loss, [*w, unused])


def test_unusual_calls_take_the_public_path_and_its_errors():
    w, _, _ = small_graph()
    vector = torch.tanh(w[1]) * 2
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        autodiff.grad(vector, w)  # no default gradient for a non-scalar output
    with pytest.raises(RuntimeError, match="does not require grad"):
        autodiff.grad(torch.ones(()), w)
    with pytest.raises(RuntimeError, match="[Mm]ismatch in shape"):
        autodiff.grad(vector, w, grad_outputs=torch.ones(4))


def test_tensor_subclass_goes_through_torch_autograd_grad(monkeypatch):
    class Tagged(torch.Tensor):
        pass

    calls = []
    public = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return public(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    w = torch.randn(3, requires_grad=True).as_subclass(Tagged)
    (g,) = autodiff.grad((w * w).sum(), [w])
    assert calls and torch.allclose(g, 2 * w.detach())
    calls.clear()
    plain = torch.randn(3, requires_grad=True)
    autodiff.grad((plain * plain).sum(), [plain])
    assert not calls


def test_backward_accumulates_like_tensor_backward():
    w, _, loss = small_graph()
    w2, _, loss2 = small_graph()  # the same graph again, on separate tensors
    for p, q in zip(w, w2):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    autodiff.backward(loss, w)
    loss2.backward(inputs=w2)
    for p, q in zip(w, w2):
        assert torch.equal(p.grad, q.grad) and not torch.equal(p.grad, torch.ones_like(p))


def test_broken_engine_falls_back(monkeypatch):
    class Broken:
        def run_backward(self, *args):
            raise TypeError("run_backward(): incompatible function arguments")

    monkeypatch.setattr(autodiff, "_ENGINE", Broken())
    autodiff.use_engine(True)
    assert not autodiff.engine_in_use()
    w, _, loss = small_graph()
    public = torch.autograd.grad(loss, w, retain_graph=True)
    for a, b in zip(autodiff.grad(loss, w), public):
        assert torch.equal(a, b)


def test_use_engine_false_routes_to_public(monkeypatch):
    calls = []
    public = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad",
                        lambda *a, **k: calls.append(1) or public(*a, **k))
    autodiff.use_engine(False)
    w, _, loss = small_graph()
    autodiff.grad(loss, w)
    assert calls


def bilevel_run(steps: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    log_wd = torch.nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
    net.double()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 4, generator=gen, dtype=torch.float64),
             torch.randn(16, 1, generator=gen, dtype=torch.float64)) for _ in range(3)]

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=data)
    def inner(batch, outer):
        x, y = batch
        return ((net(x) - y) ** 2).mean() + outer.module.exp() * sum(
            p.pow(2).sum() for p in net.parameters())

    @ml.level(upper_of="inner", grad=ml.hypergrad.cg(iterations=4, mu=0.1), module=log_wd,
              optimizer=torch.optim.SGD([log_wd], lr=0.5), data=data)
    def outer(batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    ml.program(inner, outer, progress=False).run(steps=steps)
    return [log_wd.detach().clone(), *(p.detach().clone() for p in net.parameters())]


def test_program_results_identical_with_and_without_engine():
    fast = bilevel_run(6)
    autodiff.use_engine(False)
    public = bilevel_run(6)
    assert fast[0].item() != -2.0  # the hyperparameter moved
    for a, b in zip(fast, public):
        assert torch.equal(a, b)


def test_first_use_under_inference_mode_still_checks_the_engine_properly():
    autodiff.use_engine(True)  # forget the earlier check
    with torch.inference_mode():
        assert autodiff.engine_in_use()
