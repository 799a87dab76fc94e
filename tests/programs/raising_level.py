"""Bad at run time: the level function raises ValueError on the third batch of its data."""

import torch

import mlodsl as ml

w = torch.nn.Parameter(torch.zeros(3))
data = [(torch.ones(3), 1), (torch.ones(3), 1), (torch.ones(3), -1)]


@ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1), data=data)
def regressor(batch):
    x, label = batch
    if label < 0:
        raise ValueError(f"negative label {label}")
    return (w - label * x).pow(2).sum()


def build():
    return ml.program(regressor)
