"""Bad at trace time: 'top' unrolls 'mid', but 'mid' computes its own hypergradient through
'low' with cg; differentiating through an implicit hypergradient is not supported."""

import torch

import mlodsl as ml


def build():
    nets = [torch.nn.Linear(2, 1) for _ in range(3)]

    @ml.level(module=nets[0], optimizer=torch.optim.SGD(nets[0].parameters(), lr=0.1))
    def low(mid):
        return (nets[0].weight - mid.weight).pow(2).sum()

    @ml.level(upper_of="low", grad="cg", module=nets[1],
              optimizer=torch.optim.SGD(nets[1].parameters(), lr=0.1))
    def mid(low, top):
        return (nets[1].weight - top.weight).pow(2).sum() + low.weight.sum()

    @ml.level(upper_of="mid", grad="unroll", module=nets[2],
              optimizer=torch.optim.SGD(nets[2].parameters(), lr=0.1))
    def top(mid):
        return mid.weight.pow(2).sum()

    return ml.program(low, mid, top)
