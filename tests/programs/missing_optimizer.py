"""Bad: the level 'hpo' has a module but no optimizer."""

import torch

import mlodsl as ml

w = torch.nn.Parameter(torch.zeros(3))
lam = torch.nn.Parameter(torch.zeros(3))


@ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
def classifier(hpo):
    return (w - 1).pow(2).sum() + (hpo.exp() * w.pow(2)).sum()


@ml.level(upper_of="classifier", module=lam)
def hpo(classifier):
    return (classifier - 2).pow(2).sum()


def build():
    return ml.program(classifier, hpo)
