"""Good: one upper level 'hpo' directly above two lowers 'a' and 'b'.

Each lower fits its own batch under a weight decay exp(lam) learned by 'hpo', which reads both.
"""

import torch

import mlodsl as ml


def build(grad="cg", inner_steps=1, **options):
    """A fresh program (new parameters and optimizers) on every call."""
    pa = torch.nn.Parameter(torch.zeros(3))
    pb = torch.nn.Parameter(torch.zeros(3))
    lam = torch.nn.Parameter(torch.zeros(3))
    data_a = [torch.ones(3), 2 * torch.ones(3)]
    data_b = [-torch.ones(3)]

    @ml.level(module=pa, optimizer=torch.optim.SGD([pa], lr=0.1), data=[(x,) for x in data_a])
    def a(batch, hpo):
        (target,) = batch
        return 0.5 * (pa - target).pow(2).sum() + 0.5 * (hpo.exp() * pa.pow(2)).sum()

    @ml.level(module=pb, optimizer=torch.optim.SGD([pb], lr=0.1), data=[(x,) for x in data_b])
    def b(batch, hpo):
        (target,) = batch
        return 0.5 * (pb - target).pow(2).sum() + 0.5 * (hpo.exp() * pb.pow(2)).sum()

    @ml.level(upper_of=("a", "b"), grad=grad, inner_steps=inner_steps, module=lam,
              optimizer=torch.optim.SGD([lam], lr=0.1))
    def hpo(a, b):
        return 0.5 * (a.module - 1.5).pow(2).sum() + 0.5 * (b.module + 0.5).pow(2).sum()

    return ml.program(a, b, hpo, **options)
