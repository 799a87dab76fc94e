"""Good: one lower level 'low' directly below two uppers 'left' and 'right'.

'low' is pulled towards left + right; each upper wants 'low' at its own target.
"""

import torch

import mlodsl as ml


def build(grad="cg", inner_steps=1, **options):
    """A fresh program (new parameters and optimizers) on every call."""
    w = torch.nn.Parameter(torch.zeros(3))
    left_p = torch.nn.Parameter(torch.zeros(3))
    right_p = torch.nn.Parameter(torch.zeros(3))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def low(left, right):
        return 0.5 * (w - left.module - right.module).pow(2).sum() + 0.05 * w.pow(2).sum()

    @ml.level(upper_of="low", grad=grad, inner_steps=inner_steps, module=left_p,
              optimizer=torch.optim.SGD([left_p], lr=0.1))
    def left(low):
        return 0.5 * (low.module - 1).pow(2).sum() + 0.01 * left_p.pow(2).sum()

    @ml.level(upper_of="low", grad=grad, inner_steps=inner_steps, module=right_p,
              optimizer=torch.optim.SGD([right_p], lr=0.1))
    def right(low):
        return 0.5 * (low.module - 3).pow(2).sum() + 0.01 * right_p.pow(2).sum()

    return ml.program(low, left, right, **options)
