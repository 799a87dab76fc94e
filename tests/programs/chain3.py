"""Good: a chain of three levels, top -> mid -> low (each upper_of the next).

low:  1/2 |w - mu|^2 + 1/2 |w|^2            reads mid
mid:  1/2 |mu - lam|^2 + 1/2 |low - 1|^2    reads top and low
top:  1/2 |low - 2|^2 + 1/2 |mid|^2 + ...   reads mid and low (so its hypergradient flows along
                                            low -> mid -> top and mid -> top)
"""

import torch

import mlodsl as ml


def build(grad="cg", inner_steps=1, **options):
    """A fresh program (new parameters and optimizers) on every call."""
    w = torch.nn.Parameter(torch.zeros(3))
    mu = torch.nn.Parameter(torch.zeros(3))
    lam = torch.nn.Parameter(torch.zeros(3))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def low(mid):
        return 0.5 * (w - mid.module).pow(2).sum() + 0.5 * w.pow(2).sum()

    @ml.level(upper_of="low", grad=grad, inner_steps=inner_steps, module=mu,
              optimizer=torch.optim.SGD([mu], lr=0.1))
    def mid(top, low):
        return 0.5 * (mu - top.module).pow(2).sum() + 0.5 * (low.module - 1).pow(2).sum()

    @ml.level(upper_of="mid", grad=grad, inner_steps=inner_steps, module=lam,
              optimizer=torch.optim.SGD([lam], lr=0.1))
    def top(mid, low):
        return (0.5 * (low.module - 2).pow(2).sum() + 0.5 * mid.module.pow(2).sum()
                + 0.05 * lam.pow(2).sum())

    return ml.program(low, mid, top, **options)
