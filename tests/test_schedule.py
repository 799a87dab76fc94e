"""Compiled schedules: which level steps when, in which order."""

from __future__ import annotations

import torch

import mlodsl as ml
from mlodsl.compile import compile_schedule


def scalar_level(name, upper_of=None, inner_steps=1, reads=(), log=None, grad="finite_diff"):
    """A level training one scalar; its loss reads the named levels so every edge is live."""
    p = torch.nn.Parameter(torch.tensor(0.5))

    def fn(**handles):
        if log is not None:
            log.append(name)
        total = (p - 1.0) ** 2
        for handle in handles.values():
            total = total + 0.1 * p * handle.module
        return total

    import inspect
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(r, inspect.Parameter.KEYWORD_ONLY) for r in reads])
    fn.__name__ = name
    return ml.level(name=name, upper_of=upper_of, inner_steps=inner_steps, module=p,
                    grad=grad if upper_of else None,
                    optimizer=torch.optim.SGD([p], lr=0.1))(fn)


def test_chain_with_inner_steps():
    log: list[str] = []
    low = scalar_level("low", reads=("mid",), log=log)
    mid = scalar_level("mid", upper_of="low", inner_steps=2, reads=("low", "top"), log=log)
    top = scalar_level("top", upper_of="mid", inner_steps=3, reads=("mid", "low"), log=log)
    program = ml.program(top, mid, low)
    schedule = program.compile()
    assert [(a.level, a.every) for a in schedule.actions] == [("low", 1), ("mid", 2), ("top", 6)]
    assert schedule.cycle == 6
    assert schedule.expand(6) == [(1, ("low",)), (2, ("low", "mid")), (3, ("low",)),
                                  (4, ("low", "mid")), (5, ("low",)), (6, ("low", "mid", "top"))]
    assert schedule.actions[2].below == ("low", "mid")
    text = str(schedule)
    assert "every 6 steps" in text and "through mid, low" in text

    program.run(steps=12)
    assert program.steps == {"program": 12, "low": 12, "mid": 6, "top": 2}
    # Each step evaluates the stepping level once; hypergradients re-evaluate lowers. The first
    # entries of each program step are the updates in bottom-up order.
    assert log[:2] == ["low", "low"]
    assert [r["global_step"] for r in program.history["top"]] == [6, 12]


def test_several_lowers_under_one_upper_use_lcm():
    a = scalar_level("a", reads=("up",))
    b = scalar_level("b", reads=("mid",))
    mid = scalar_level("mid", upper_of="b", inner_steps=2, reads=("b", "up"))
    up = scalar_level("up", upper_of=("a", "mid"), inner_steps=1, reads=("a", "mid"))
    program = ml.program(a, b, mid, up)
    every = {act.level: act.every for act in program.compile().actions}
    assert every == {"a": 1, "b": 1, "mid": 2, "up": 2}
    program.run(steps=4)
    assert program.steps == {"program": 4, "a": 4, "b": 4, "mid": 2, "up": 2}


def test_one_lower_under_several_uppers():
    low = scalar_level("low", reads=("u1", "u2"))
    u1 = scalar_level("u1", upper_of="low", inner_steps=2, reads=("low",))
    u2 = scalar_level("u2", upper_of="low", inner_steps=3, reads=("low",))
    program = ml.program(low, u1, u2)
    assert {a.level: a.every for a in program.compile().actions} == {"low": 1, "u1": 2, "u2": 3}
    assert {(e.upper, e.lower) for e in program.edges} == {("u1", "low"), ("u2", "low")}
    program.run(steps=6)
    assert program.steps == {"program": 6, "low": 6, "u1": 3, "u2": 2}


def test_compiler_is_pure_python():
    schedule = compile_schedule(order=["x", "y"], lowers={"x": (), "y": ("x",)},
                                inner_steps={"x": 1, "y": 4}, methods={"x": None, "y": "cg"})
    assert schedule.at(4) == schedule.actions and schedule.at(3) == schedule.actions[:1]
