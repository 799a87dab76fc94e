"""Bad: a plain function (the decorator was forgotten) is passed to ml.program."""

import torch

import mlodsl as ml

w = torch.nn.Parameter(torch.zeros(3))
lam = torch.nn.Parameter(torch.zeros(3))


@ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
def classifier():
    return (w - 1).pow(2).sum()


def hpo(classifier):
    return (classifier - 2).pow(2).sum() + lam.pow(2).sum()


def build():
    return ml.program(classifier, hpo)
