"""Bad: init_from="meta", an option this version does not implement yet (MAML arrives with
grad='unroll')."""

import torch

import mlodsl as ml


def build():
    w = torch.nn.Parameter(torch.zeros(3))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1), init_from="meta")
    def regressor():
        return (w - 1).pow(2).sum()

    return ml.program(regressor)
