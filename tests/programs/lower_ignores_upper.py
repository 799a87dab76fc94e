"""Bad at run time: 'classifier' is below 'hpo' but its loss never reads 'hpo'."""

import torch

import mlodsl as ml

w = torch.nn.Parameter(torch.zeros(3))
lam = torch.nn.Parameter(torch.zeros(3))


@ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
def classifier():
    return (w - 1).pow(2).sum()


@ml.level(upper_of="classifier", module=lam, optimizer=torch.optim.SGD([lam], lr=0.1))
def hpo(classifier):
    return (classifier - 2).pow(2).sum() + 0.1 * lam.pow(2).sum()


def build():
    return ml.program(classifier, hpo)
