"""flat_vmap (mlodsl.batching): the same results and errors as torch.func.vmap."""

from __future__ import annotations

import pytest
import torch

from mlodsl import batching


@pytest.fixture(autouse=True)
def primitives_on():
    previous = batching.use_primitives(True)
    yield
    batching.use_primitives(previous)


@pytest.fixture
def public_vmap_forbidden(monkeypatch):
    assert batching.primitives_in_use()  # the one-off check compares with torch.func.vmap

    def refuse(*args, **kwargs):
        raise AssertionError("torch.func.vmap was called")
    monkeypatch.setattr(torch.func, "vmap", refuse)


def step(w, b, x, y):
    """A per-task gradient step and loss; w, b may be shared or per task."""
    def loss(params):
        return ((x @ params[0] + params[1]).tanh() - y).pow(2).mean()
    (gw, gb), value = torch.func.grad_and_value(loss)((w, b))
    return w - 0.1 * gw, b - 0.1 * gb, value, torch.ones(())  # the last: not batched


def data(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(3, 2, generator=gen, dtype=dtype, requires_grad=True),
            torch.randn(2, generator=gen, dtype=dtype, requires_grad=True),
            torch.randn(5, 4, 3, generator=gen, dtype=dtype),
            torch.randn(5, 4, 2, generator=gen, dtype=dtype))


def test_primitives_are_used_on_this_torch():
    assert batching.primitives_in_use()


@pytest.mark.parametrize("dims", [(None, None, 0, 0), (0, 0, 0, 0)])
def test_equals_torch_func_vmap_and_its_gradients(dims):
    w, b, x, y = data()
    args = (w, b, x, y) if dims[0] is None else (
        w.expand(5, 3, 2), b.expand(5, 2), x, y)
    public = torch.func.vmap(step, in_dims=dims)(*args)
    ours = batching.flat_vmap(step, dims, args)
    assert len(ours) == len(public) == 4
    for a, p in zip(ours, public):
        assert a.shape == p.shape and torch.equal(a, p)
    assert ours[3].shape == (5,)  # an output that ignores the batch is expanded, as vmap does
    # Differentiable through the step, as MAML needs.
    g_ours = torch.autograd.grad(ours[0].sum() + ours[2].sum(), (w, b))
    g_public = torch.autograd.grad(public[0].sum() + public[2].sum(), (w, b))
    for a, p in zip(g_ours, g_public):
        assert torch.allclose(a, p, rtol=1e-12, atol=1e-14)


def test_does_not_go_through_torch_func_vmap(public_vmap_forbidden):
    w, b, x, y = data()
    out = batching.flat_vmap(step, (None, None, 0, 0), (w, b, x, y))
    assert out[0].shape == (5, 3, 2)


def test_vmap_level_is_left_on_error():
    w, b, x, y = data()

    def broken(*args):
        raise ValueError("inside the task function")

    with pytest.raises(ValueError, match="inside the task function"):
        batching.flat_vmap(broken, (None, None, 0, 0), (w, b, x, y))
    # The level was popped: a later call (and plain code) runs unbatched as usual.
    out = batching.flat_vmap(step, (None, None, 0, 0), (w, b, x, y))
    assert out[0].shape == (5, 3, 2)
    assert not torch._C._functorch.is_batchedtensor(w * 2)


def test_disagreeing_batch_sizes_get_torch_func_vmaps_error():
    w, b, x, y = data()
    with pytest.raises(ValueError, match="same size"):
        batching.flat_vmap(step, (None, None, 0, 0), (w, b, x, y[:3]))


def test_primitives_that_disagree_with_vmap_are_not_used(monkeypatch):
    monkeypatch.setattr(batching, "_batched", lambda fn, dims, args, size: (torch.zeros(1),))
    batching.use_primitives(True)
    assert not batching.primitives_in_use()
    w, b, x, y = data()
    out = batching.flat_vmap(step, (None, None, 0, 0), (w, b, x, y))
    assert out[0].shape == (5, 3, 2)


def test_use_primitives_false_routes_to_torch_func_vmap(monkeypatch):
    calls = []
    public = torch.func.vmap
    monkeypatch.setattr(torch.func, "vmap", lambda *a, **k: calls.append(1) or public(*a, **k))
    batching.use_primitives(False)
    w, b, x, y = data()
    batching.flat_vmap(step, (None, None, 0, 0), (w, b, x, y))
    assert calls
