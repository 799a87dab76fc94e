"""Bad: two different functions are both given the level name 'a'."""

import torch

import mlodsl as ml

p = torch.nn.Parameter(torch.zeros(3))
q = torch.nn.Parameter(torch.zeros(3))


@ml.level(name="a", module=p, optimizer=torch.optim.SGD([p], lr=0.1))
def first():
    return (p - 1).pow(2).sum()


@ml.level(name="a", module=q, optimizer=torch.optim.SGD([q], lr=0.1))
def second():
    return (q + 1).pow(2).sum()


def build():
    return ml.program(first, second)
