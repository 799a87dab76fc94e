"""Bad: data is a generator, which can be read only once (mlodsl cycles data forever)."""

import torch

import mlodsl as ml

w = torch.nn.Parameter(torch.zeros(3))


def batches():
    for _ in range(4):
        yield torch.ones(3)


@ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1), data=batches())
def regressor(batch):
    return (w - batch).pow(2).sum()


def build():
    return ml.program(regressor)
