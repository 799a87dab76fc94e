"""Bad at run time: the level returns a dict of metrics without a 'loss' entry."""

import torch

import mlodsl as ml

w = torch.nn.Parameter(torch.zeros(3))


@ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
def regressor():
    error = (w - 1).pow(2).sum()
    return {"objective": error, "norm": w.norm()}


def build():
    return ml.program(regressor)
