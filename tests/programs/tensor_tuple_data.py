"""Bad: data is a tuple (x, y) of tensors, which would be iterated element by element."""

import torch

import mlodsl as ml

w = torch.nn.Parameter(torch.zeros(3))
x, y = torch.ones(5, 3), torch.ones(5)


@ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1), data=(x, y))
def regressor(batch):
    inputs, targets = batch
    return (inputs @ w - targets).pow(2).mean()


def build():
    return ml.program(regressor)
