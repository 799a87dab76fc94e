"""Bad: distributed='fsdp', a value the distributed option does not accept."""

import torch

import mlodsl as ml


def build():
    w = torch.nn.Parameter(torch.zeros(3))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def regressor():
        return (w - 1).pow(2).sum()

    return ml.program(regressor, distributed="fsdp")
