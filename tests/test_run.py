"""Running programs: continuation, data, hooks, history, schedulers, devices, handles."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import mlodsl as ml
from quadratic import make_ridge, ridge_program


def regression_program(seed: int = 0, data_kind: str = "loader", **options):
    """A small MLP regressor under a learned per-output weight decay, with real DataLoaders."""
    torch.manual_seed(seed)
    X, Y = torch.randn(64, 4), torch.randn(64, 2)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    log_wd = torch.nn.Parameter(torch.full((2,), -3.0))
    gen = torch.Generator().manual_seed(seed)
    train = {
        "loader": DataLoader(TensorDataset(X[:48], Y[:48]), batch_size=16, shuffle=True,
                             generator=gen),
        "list": [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 48, 16)],
        "callable": lambda: (X[:16], Y[:16]),
    }[data_kind]
    seen = []

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), data=train)
    def fit(batch, hpo, *, step, epoch):
        x, y = batch
        seen.append((step, epoch, x.shape[0]))
        penalty = (hpo.exp() * net[2].weight.pow(2).sum(1)).sum()
        return {"loss": (net(x) - y).pow(2).mean() + penalty, "mse": (net(x) - y).pow(2).mean()}

    @ml.level(upper_of="fit", grad="cg", module=log_wd, inner_steps=2,
              optimizer=torch.optim.Adam([log_wd], lr=0.01), data=[(X[48:], Y[48:])])
    def hpo(batch, fit):
        x, y = batch
        return (fit(x) - y).pow(2).mean()

    return ml.program(fit, hpo, **options), net, log_wd, seen


def state(net, log_wd):
    return [p.detach().clone() for p in net.parameters()] + [log_wd.detach().clone()]


@pytest.mark.parametrize("data_kind", ["loader", "list", "callable"])
def test_second_run_continues_where_the_first_stopped(data_kind):
    straight, net_a, wd_a, _ = regression_program(data_kind=data_kind)
    straight.run(steps=10)
    split, net_b, wd_b, _ = regression_program(data_kind=data_kind)
    split.run(steps=3)
    history = split.run(steps=7)
    for a, b in zip(state(net_a, wd_a), state(net_b, wd_b)):
        assert torch.equal(a, b)
    assert split.steps == {"program": 10, "fit": 10, "hpo": 5}
    assert [r["step"] for r in history["fit"]] == list(range(1, 11))
    assert history.series("fit", "loss") == straight.history.series("fit", "loss")


def test_dataloader_cycles_forever_and_counts_epochs():
    program, _, _, seen = regression_program(data_kind="loader")
    program.run(steps=7)
    # 48 examples in batches of 16: 3 batches an epoch. The hypergradient re-evaluates 'fit' on
    # its current batch too; the stepping call is the last one that sees a given step count.
    steps = sorted({s: e for s, e, _ in seen}.items())
    assert steps == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 2)]


def test_history_holds_loss_metrics_and_hypergradient_figures():
    program, *_ = regression_program()
    history = program.run(steps=4)
    fit, hpo = history["fit"], history["hpo"]
    assert len(fit) == 4 and len(hpo) == 2
    assert set(fit[0]) >= {"loss", "mse", "step", "global_step"}
    assert isinstance(fit[0]["loss"], float)
    assert set(hpo[0]) >= {"loss", "hypergrad_norm", "hpo->fit/residual", "hpo->fit/iterations"}
    assert history.last("hpo")["step"] == 2
    assert "fit: 4 steps" in repr(history)


def test_hooks_called_with_keyword_arguments_in_order():
    events = []

    class Recorder:
        def on_run_start(self, *, program, steps):
            events.append(("start", steps))

        def on_step_end(self, *, program, level, step, metrics):
            events.append(("step", level, step))

        def on_hypergrad(self, *, program, level, step, grads, diagnostics):
            events.append(("hypergrad", level, step, len(grads), "hpo->fit/residual" in diagnostics))

        def on_run_end(self, *, program, history):
            events.append(("end", len(history["fit"])))

    class OnlyEnd:  # a hook may define any subset of the methods
        def on_run_end(self, *, program, history):
            events.append(("only-end",))

    program, *_ = regression_program(hooks=[Recorder(), OnlyEnd()])
    program.run(steps=2)
    assert events == [("start", 2), ("step", "fit", 1), ("step", "fit", 2),
                      ("hypergrad", "hpo", 1, 1, True), ("step", "hpo", 1), ("end", 2),
                      ("only-end",)]


def test_run_end_hook_fires_when_a_level_fails():
    ended = []

    class Hook:
        def on_run_end(self, *, program, history):
            ended.append(True)

    w = torch.nn.Parameter(torch.zeros(2))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def broken(step):
        if step == 2:
            raise ValueError("boom")
        return w.pow(2).sum() + 1

    program = ml.program(broken, hooks=[Hook()])
    with pytest.raises(ValueError, match="boom") as info:
        program.run(steps=5)
    assert ended == [True]
    assert any("level 'broken'" in n and "step 3" in n for n in info.value.__notes__)
    assert program.steps["broken"] == 2  # the two good steps are kept


def test_scheduler_steps_once_per_optimizer_step():
    r = make_ridge()
    # ridge_program builds the optimizers itself; attach a scheduler through a fresh program.
    opt = torch.optim.SGD([r.w], lr=0.1)

    @ml.level(module=r.w, optimizer=opt,
              scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5))
    def ridge():
        return 0.5 * (r.X @ r.w - r.y).pow(2).mean()

    program = ml.program(ridge)
    program.run(steps=7)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)


def test_clip_grad_norm_limits_the_update():
    w = torch.nn.Parameter(torch.zeros(3))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=1.0), clip_grad_norm=0.5)
    def steep():
        return 100.0 * w.sum()

    ml.program(steep).run(steps=1)
    assert float(w.detach().norm()) == pytest.approx(0.5, rel=1e-6)


def test_device_option_moves_nested_batches():
    Pair = namedtuple("Pair", "x y")
    seen = []
    w = torch.nn.Parameter(torch.zeros(3))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1),
              data=lambda: {"pair": Pair(torch.ones(3), torch.zeros(3)), "tag": "t"})
    def lvl(batch):
        seen.append(batch)
        return (w * batch["pair"].x - batch["pair"].y).pow(2).sum()

    program = ml.program(lvl, device="cpu")
    program.run(steps=1)
    assert isinstance(seen[0]["pair"], Pair) and seen[0]["tag"] == "t"
    assert seen[0]["pair"].x.device == torch.device("cpu")


def test_handles_reach_modules_tensors_and_containers():
    net = torch.nn.Linear(2, 1)
    scale = torch.nn.Parameter(torch.tensor(0.0))
    pair = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))]
    checks = {}

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    def model(hyper, extra):
        x = torch.ones(4, 2)
        checks["call"] = torch.equal(model_handle_out(extra, x), net(x))
        checks["exp"] = torch.equal(hyper.exp(), scale.exp())
        checks["torch_fn"] = torch.equal(torch.exp(hyper), scale.exp())
        checks["arith"] = torch.equal(2 * hyper + 1, 2 * scale + 1)
        checks["index"] = extra[0] is pair[0] and len(extra) == 2
        checks["module"] = hyper.module is scale
        return net(x).pow(2).mean() * hyper.exp() + sum(p.sum() for p in extra) * 0.0

    def model_handle_out(extra, x):
        return net(x)

    @ml.level(upper_of="model", grad="finite_diff", module=scale,
              optimizer=torch.optim.SGD([scale], lr=0.1))
    def hyper(model):
        checks["model_call"] = model(torch.ones(1, 2)).shape == (1, 1)
        checks["model_attr"] = model.weight is net.weight
        return model(torch.ones(3, 2)).pow(2).mean()

    @ml.level(module=pair, optimizer=torch.optim.SGD(pair, lr=0.1))
    def extra(model):
        return sum(p.pow(2).sum() for p in pair) + 0.0 * model.weight.sum()

    ml.program(model, hyper, extra).run(steps=1)
    assert checks == {k: True for k in checks} and len(checks) == 8


def test_calling_a_tensor_handle_is_a_clear_error():
    w = torch.nn.Parameter(torch.zeros(2))
    h = torch.nn.Parameter(torch.zeros(2))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def low(up):
        return (w - up(1.0)).pow(2).sum()

    @ml.level(upper_of="low", module=h, optimizer=torch.optim.SGD([h], lr=0.1))
    def up(low):
        return low.module.sum()

    with pytest.raises(ml.errors.LevelRuntimeError, match=r"level 'up' trains a Parameter"):
        ml.program(low, up).run(steps=1)


def test_program_is_immutable_and_prints_readably():
    r = make_ridge()
    program = ridge_program(r, "cg", inner_steps=3)
    with pytest.raises(AttributeError):
        program.levels = ()
    with pytest.raises(TypeError):
        program.options["seed"] = 1
    text = str(program)
    assert "hpo -> ridge  grad=cg  inner_steps=3" in text
    assert "hpo reads ridge" in text and "every 3 steps" in text
    assert "quadratic.py:" in text
    program.run(steps=3)
    drawing = str(program.visualize())
    assert drawing.splitlines()[0].startswith("hpo [1 steps")
    assert "--cg, inner_steps=3" in drawing and "ridge [3 steps" in drawing


def test_seed_option_makes_runs_repeatable():
    def run_once():
        net = torch.nn.Linear(3, 1)
        with torch.no_grad():
            net.weight.zero_(), net.bias.zero_()

        @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                  data=lambda: (torch.randn(8, 3), torch.randn(8, 1)))
        def noisy(batch):
            return (net(batch[0]) - batch[1]).pow(2).mean()

        ml.program(noisy, seed=123).run(steps=5)
        return net.weight.detach().clone()

    assert torch.equal(run_once(), run_once())


def test_run_rejects_bad_steps():
    program = ridge_program(make_ridge(), "cg")
    with pytest.raises(ValueError, match="non-negative integer"):
        program.run(steps=-1)


def test_history_turns_tensors_into_numbers_in_batches_on_long_runs():
    """A long run must not keep a tensor alive per metric per step until someone reads it."""
    w = torch.nn.Parameter(torch.zeros(2))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.01))
    def fit():
        return {"loss": (w - 1).pow(2).sum(), "norm": w.norm()}

    program = ml.program(fit, progress=False)
    program.run(steps=300)
    stored = program.history._records["fit"]
    assert all(isinstance(v, float) for r in stored[:256] for k, v in r.items()
               if k in ("loss", "norm"))
    assert program.history.series("fit", "loss")[-1] < program.history.series("fit", "loss")[0]
