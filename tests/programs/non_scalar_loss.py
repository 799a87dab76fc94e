"""Bad at run time: the level returns a loss of shape (3,), not a scalar."""

import torch

import mlodsl as ml

w = torch.nn.Parameter(torch.zeros(3))


@ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
def regressor():
    return (w - 1).pow(2)


def build():
    return ml.program(regressor)
