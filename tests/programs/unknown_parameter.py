"""Bad: 'hpo' has a parameter 'clasifier', a typo of the level name 'classifier'."""

import torch

import mlodsl as ml

w = torch.nn.Parameter(torch.zeros(3))
lam = torch.nn.Parameter(torch.zeros(3))


@ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
def classifier(hpo):
    return (w - 1).pow(2).sum() + (hpo.exp() * w.pow(2)).sum()


@ml.level(upper_of="classifier", module=lam, optimizer=torch.optim.SGD([lam], lr=0.1))
def hpo(clasifier):
    return (clasifier - 2).pow(2).sum()


def build():
    return ml.program(classifier, hpo)
