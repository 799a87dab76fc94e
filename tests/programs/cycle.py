"""Bad: a cycle of three levels: a upper_of b, b upper_of c, c upper_of a."""

import torch

import mlodsl as ml

pa = torch.nn.Parameter(torch.zeros(3))
pb = torch.nn.Parameter(torch.zeros(3))
pc = torch.nn.Parameter(torch.zeros(3))


@ml.level(upper_of="b", module=pa, optimizer=torch.optim.SGD([pa], lr=0.1))
def a(b, c):
    return (b - pa).pow(2).sum() + (pa - c).pow(2).sum()


@ml.level(upper_of="c", module=pb, optimizer=torch.optim.SGD([pb], lr=0.1))
def b(a, c):
    return (c - pb).pow(2).sum() + (pb - a).pow(2).sum()


@ml.level(upper_of="a", module=pc, optimizer=torch.optim.SGD([pc], lr=0.1))
def c(a, b):
    return (a - pc).pow(2).sum() + (pc - b).pow(2).sum()


def build():
    return ml.program(a, b, c)
