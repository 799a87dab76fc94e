"""Per-level training features: accumulation, schedulers, optimizer groups, warmup,
precision, validation and early stopping, non-finite values, interrupts, seeding."""

from __future__ import annotations

import signal

import pytest
import torch

import mlodsl as ml
from mlodsl.errors import NonFiniteError
from quadratic import DTYPE, make_ridge

gen = torch.Generator().manual_seed(0)
X = torch.randn(64, 4, generator=gen, dtype=DTYPE)
Y = X @ torch.randn(4, 1, generator=gen, dtype=DTYPE) + 0.1 * torch.randn(64, 1, generator=gen,
                                                                           dtype=DTYPE)


def regression(batches, accumulate=1, **level_options):
    w = torch.nn.Parameter(torch.zeros(4, 1, dtype=DTYPE))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1), data=batches,
              accumulate=accumulate, **level_options)
    def fit(batch):
        x, y = batch
        return (x @ w - y).pow(2).mean()

    return ml.program(fit, progress=False), w


def test_accumulation_equals_one_larger_batch():
    small = [(X[i:i + 8], Y[i:i + 8]) for i in range(0, 64, 8)]
    large = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 64, 16)]
    accumulated, w_acc = regression(small, accumulate=2)
    plain, w_plain = regression(large)
    accumulated.run(steps=7)
    plain.run(steps=7)
    assert torch.allclose(w_acc, w_plain, rtol=1e-12, atol=1e-14)
    assert accumulated.steps["fit"] == 7
    assert accumulated.history["fit"][0]["loss"] == pytest.approx(plain.history["fit"][0]["loss"])


def test_upper_level_accumulates_hypergradients_consistently():
    """An upper level with accumulate=2 over validation halves applies the hypergradient of the
    whole validation set (the lower level sees the same data in both programs)."""

    def build(accumulate):
        r = make_ridge()
        halves = [(r.Xv[:30], r.yv[:30]), (r.Xv[30:], r.yv[30:])]
        data = halves if accumulate == 2 else [(r.Xv, r.yv)]

        @ml.level(module=r.w, optimizer=torch.optim.SGD([r.w], lr=0.1))
        def ridge(hpo):
            return 0.5 * (r.X @ r.w - r.y).pow(2).mean() + 0.5 * (hpo.exp() * r.w ** 2).sum()

        @ml.level(upper_of="ridge", grad="exact", module=r.lam, data=data,
                  accumulate=accumulate, optimizer=torch.optim.SGD([r.lam], lr=0.5))
        def hpo(batch, ridge):
            xv, yv = batch
            return 0.5 * (xv @ ridge.module - yv).pow(2).mean()

        return ml.program(ridge, hpo, progress=False), r

    (a, ra), (b, rb) = build(2), build(1)
    a.run(steps=3)
    b.run(steps=3)
    assert torch.allclose(ra.lam, rb.lam, rtol=1e-12, atol=1e-14)
    assert not torch.equal(ra.lam, make_ridge().lam)


def test_scheduler_on_accumulated_level_steps_once_per_optimizer_step():
    w = torch.nn.Parameter(torch.zeros(4, 1, dtype=DTYPE))
    opt = torch.optim.SGD([w], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    @ml.level(module=w, optimizer=opt, scheduler=scheduler, accumulate=3,
              data=[(X[i:i + 4], Y[i:i + 4]) for i in range(0, 64, 4)])
    def fit(batch):
        return (batch[0] @ w - batch[1]).pow(2).mean()

    ml.program(fit, progress=False).run(steps=5)
    assert scheduler.last_epoch == 5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_users_optimizer_groups_and_settings_survive():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)).double()
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": 0.0},
                           {"params": net[1].parameters(), "lr": 0.05, "momentum": 0.9}])
    first = [p.detach().clone() for p in net[0].parameters()]

    @ml.level(module=net, optimizer=opt, data=lambda: (X, Y))
    def fit(batch):
        return (net(batch[0]) - batch[1]).pow(2).mean()

    program = ml.program(fit, progress=False)
    program.run(steps=3)
    assert program.level("fit").optimizer is opt
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.05]
    assert opt.param_groups[1]["momentum"] == 0.9
    assert all(torch.equal(a, b) for a, b in zip(first, net[0].parameters()))  # lr 0: frozen
    assert all("momentum_buffer" in opt.state[p] for p in net[1].parameters())


def test_warmup_runs_lower_levels_alone_first():
    r = make_ridge()

    @ml.level(module=r.w, optimizer=torch.optim.SGD([r.w], lr=0.1))
    def ridge(hpo):
        return 0.5 * (r.X @ r.w - r.y).pow(2).mean() + 0.5 * (hpo.exp() * r.w ** 2).sum()

    @ml.level(upper_of="ridge", module=r.lam, optimizer=torch.optim.SGD([r.lam], lr=0.1),
              inner_steps=2, warmup=5)
    def hpo(ridge):
        return 0.5 * (r.Xv @ ridge.module - r.yv).pow(2).mean()

    program = ml.program(ridge, hpo, progress=False)
    program.run(steps=10)
    assert [rec["global_step"] for rec in program.history["hpo"]] == [6, 8, 10]
    assert program.steps["ridge"] == 10


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs_on_cpu_with_fp32_master_weights(precision):
    torch.manual_seed(0)
    x, y = torch.randn(128, 8), torch.randint(0, 3, (128,))
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    log_decay = torch.nn.Parameter(torch.tensor(-3.0))
    seen = []

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.2),
              data=lambda: (x, y), precision=precision)
    def fit(batch, hpo):
        out = net(batch[0])
        seen.append(out.dtype)
        decay = hpo.exp() * sum(p.pow(2).sum() for p in net.parameters())
        return torch.nn.functional.cross_entropy(out, batch[1]) + decay

    @ml.level(upper_of="fit", grad=ml.hypergrad.cg(mu=1.0), module=log_decay,
              optimizer=torch.optim.SGD([log_decay], lr=0.1), precision=precision,
              data=lambda: (x[:32], y[:32]))
    def hpo(batch, fit):
        return torch.nn.functional.cross_entropy(fit(batch[0]), batch[1])

    program = ml.program(fit, hpo, progress=False)
    history = program.run(steps=40)
    low = torch.bfloat16 if precision == "bf16" else torch.float16
    assert seen[0] == low
    assert all(p.dtype == torch.float32 for p in net.parameters())
    losses = history.series("fit", "loss")
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert log_decay.item() != -3.0 and torch.isfinite(log_decay).all()
    if precision == "fp16":
        assert program._runtime.precision["fit"].scaler.get_scale() > 0


def test_fp16_loss_scaling_does_not_corrupt_the_hypergradient():
    """Dynamic loss scaling may skip steps while it finds its scale (overflow in fp16), but an
    update it applies equals the fp32 one to fp16 accuracy: the scale is divided out."""

    def first_applied_update(precision):
        r = make_ridge()
        r.w.data, r.lam.data = r.w.data.float(), r.lam.data.float()
        X, y, Xv, yv = (t.float() for t in (r.X, r.y, r.Xv, r.yv))
        with torch.no_grad():
            r.w.copy_(r.solution().float())

        @ml.level(module=r.w, optimizer=torch.optim.SGD([r.w], lr=0.0))
        def ridge(hpo):
            return 0.5 * (X @ r.w - y).pow(2).mean() + 0.5 * (hpo.exp() * r.w ** 2).sum()

        @ml.level(upper_of="ridge", grad="exact", module=r.lam, precision=precision,
                  optimizer=torch.optim.SGD([r.lam], lr=1.0))
        def hpo(ridge):
            return 0.5 * (Xv @ ridge.module - yv).pow(2).mean()

        program = ml.program(ridge, hpo, progress=False)
        before = r.lam.detach().clone()
        for attempt in range(30):
            program.run(steps=1)
            if not torch.equal(r.lam.detach(), before):
                return before - r.lam.detach(), attempt
        raise AssertionError("the loss scaler never applied an update")

    (fp32, _), (fp16, _) = first_applied_update("fp32"), first_applied_update("fp16")
    assert fp32.norm() > 0
    assert torch.allclose(fp16, fp32, rtol=2e-2, atol=1e-4)


def validation_program(values, patience=2, mode="min"):
    w = torch.nn.Parameter(torch.zeros(4, 1, dtype=DTYPE))
    net = torch.nn.Dropout(0.5)
    calls = []

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.01), data=lambda: (X, Y))
    def fit(batch):
        return (net(batch[0]) @ w - batch[1]).pow(2).mean()

    def validate(fit, step):
        calls.append({"grad": torch.is_grad_enabled(), "step": step})
        return {"score": values[len(calls) - 1], "w_norm": fit.module.norm()}

    program = ml.program(fit, progress=False, validation=validate, validate_every=10,
                         early_stopping=ml.EarlyStopping("score", mode=mode, patience=patience))
    return program, calls


def test_early_stopping_stops_at_the_right_validation():
    # best at the 3rd validation; 3 validations without improvement exceed patience 2
    program, calls = validation_program([5, 4, 3, 3.5, 3.2, 3.1, 1.0, 0.5])
    program.run(steps=1000)
    assert program.steps["program"] == 60 and len(calls) == 6
    assert "'score' has not improved on 3" in program.stopped
    assert [v["global_step"] for v in program.history.validation] == [10, 20, 30, 40, 50, 60]
    assert all(not c["grad"] for c in calls) and calls[0]["step"] == 10
    assert "w_norm" in program.history.validation[0]


def test_early_stopping_on_a_missing_metric_names_what_exists():
    w = torch.nn.Parameter(torch.zeros(1))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def fit():
        return (w - 1).pow(2).sum()

    program = ml.program(fit, progress=False, validation=lambda: {"acc": 1.0}, validate_every=1,
                         early_stopping=ml.EarlyStopping("accuracy", mode="max"))
    with pytest.raises(ml.MlodslError, match=r"watches 'accuracy', but the validation callback returned acc"):
        program.run(steps=3)


def test_validation_puts_modules_in_eval_mode_and_back():
    net = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Dropout(0.5)).double()
    modes = []

    @ml.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
              data=lambda: (X, Y))
    def fit(batch):
        modes.append(("train", net.training))
        return (net(batch[0]) - batch[1]).pow(2).mean()

    def validate(program):
        modes.append(("validate", net.training))
        return {"steps": program.steps["fit"]}

    ml.program(fit, progress=False, validation=validate, validate_every=2).run(steps=4)
    assert modes == [("train", True), ("train", True), ("validate", False), ("train", True),
                     ("train", True), ("validate", False)]


def nan_program(on_nonfinite="raise", bad_step=2):
    w = torch.nn.Parameter(torch.ones(3, dtype=DTYPE))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def fit(step):
        scale = float("nan") if step == bad_step else 1.0
        return scale * (w - 2).pow(2).sum()

    return ml.program(fit, progress=False, on_nonfinite=on_nonfinite), w


def test_nan_loss_stops_the_run_naming_level_and_step_and_keeps_last_good_state():
    program, w = nan_program()
    with pytest.raises(NonFiniteError, match=r"level 'fit' \(.*\) produced a non-finite loss "
                                             r"\(nan\) at its step 3 \(program step 3\)"):
        program.run(steps=5)
    good, _ = nan_program(bad_step=-1)
    good.run(steps=2)
    assert torch.equal(w, good.level("fit").params[0]) and w.grad is None
    assert program.steps["fit"] == 2


def test_nan_loss_skipped_by_option():
    program, w = nan_program(on_nonfinite="skip")
    history = program.run(steps=5)
    assert program.steps["fit"] == 5
    assert [r.get("skipped", 0) for r in history["fit"]] == [0, 0, 1, 0, 0]
    assert torch.isfinite(w).all()


def test_nan_hypergradient_stops_the_run():
    r = make_ridge()

    @ml.level(module=r.w, optimizer=torch.optim.SGD([r.w], lr=0.1))
    def ridge(hpo):
        return 0.5 * (r.X @ r.w - r.y).pow(2).mean() + 0.5 * (hpo.exp() * r.w ** 2).sum()

    @ml.level(upper_of="ridge", grad="finite_diff", module=r.lam,
              optimizer=torch.optim.SGD([r.lam], lr=0.1))
    def hpo(ridge, step):
        # finite in value, but its gradient through the lower level is not
        return 0.5 * (r.Xv @ ridge.module - r.yv).pow(2).mean() * (torch.inf if step else 1)

    program = ml.program(ridge, hpo, progress=False)
    program.run(steps=1)
    before = r.lam.detach().clone()
    with pytest.raises(NonFiniteError, match=r"level 'hpo'.*non-finite"):
        program.run(steps=1)
    assert torch.equal(r.lam.detach(), before)


def interruptible(interrupt_at=None, how="raise"):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(4, 1, dtype=DTYPE))
    lam = torch.nn.Parameter(torch.zeros(1, dtype=DTYPE))
    state = {"fired": False}

    @ml.level(module=w, optimizer=torch.optim.Adam([w], lr=0.05),
              data=[(X[i:i + 8], Y[i:i + 8]) for i in range(0, 64, 8)])
    def fit(batch, hpo, step):
        if step == interrupt_at and not state["fired"]:
            state["fired"] = True
            if how == "raise":
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, in the middle of the step
        return (batch[0] @ w - batch[1]).pow(2).mean() + hpo.exp().sum() * w.pow(2).sum()

    @ml.level(upper_of="fit", grad="cg", module=lam, inner_steps=2,
              optimizer=torch.optim.SGD([lam], lr=0.1), data=[(X[:16], Y[:16])])
    def hpo(batch, fit):
        return (batch[0] @ fit.module - batch[1]).pow(2).mean()

    return ml.program(fit, hpo, progress=False), (w, lam)


@pytest.mark.parametrize("how", ["raise", "signal"])
def test_ctrl_c_leaves_the_program_consistent_and_run_continues(how):
    straight, params_a = interruptible()
    straight.run(steps=12)
    program, params_b = interruptible(interrupt_at=5, how=how)
    with pytest.raises(KeyboardInterrupt):
        program.run(steps=12)
    steps = program.steps
    # Raised inside the 6th update of fit: it never happened. A real SIGINT waits for the
    # update to finish and stops before hpo's update of the same program step.
    assert steps == {"program": 6, "fit": 5 if how == "raise" else 6, "hpo": 2}
    assert len(program.history["fit"]) == steps["fit"]
    program.run(steps=12 - steps["program"])  # the cut-short program step is finished first
    assert program.steps == straight.steps
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)


def test_seed_makes_runs_bit_reproducible():
    def once():
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3),
                                  torch.nn.Linear(8, 1)).double()
        init = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=init, dtype=DTYPE))

        @ml.level(module=net, optimizer=torch.optim.Adam(net.parameters(), lr=0.01),
                  data=lambda: (torch.randn(16, 4, dtype=DTYPE), torch.randn(16, 1, dtype=DTYPE)))
        def fit(batch):
            return (net(batch[0]) - batch[1]).pow(2).mean()

        ml.program(fit, seed=7, progress=False).run(steps=20)
        return [p.detach().clone() for p in net.parameters()]

    torch.manual_seed(0)
    a = once()
    torch.manual_seed(123)
    b = once()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
