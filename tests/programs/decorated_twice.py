"""Bad: one function decorated with @ml.level twice (raised when the outer decorator runs)."""

import torch

import mlodsl as ml


def build():
    w = torch.nn.Parameter(torch.zeros(3))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    @ml.level(name="classifier")
    def classifier():
        return (w - 1).pow(2).sum()

    return ml.program(classifier)
