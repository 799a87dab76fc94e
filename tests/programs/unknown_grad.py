"""Bad: grad='cgg', a typo of 'cg' (raised when @ml.level runs, so it runs inside build())."""

import torch

import mlodsl as ml


def build():
    w = torch.nn.Parameter(torch.zeros(3))
    lam = torch.nn.Parameter(torch.zeros(3))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def classifier(hpo):
        return (w - 1).pow(2).sum() + (hpo.exp() * w.pow(2)).sum()

    @ml.level(upper_of="classifier", grad="cgg", module=lam,
              optimizer=torch.optim.SGD([lam], lr=0.1))
    def hpo(classifier):
        return (classifier - 2).pow(2).sum()

    return ml.program(classifier, hpo)
