"""Bad at run time: the lower level raises when it is re-evaluated for 'hpo''s hypergradient.

Its first call (its own step 1) succeeds; its second call, made by the hypergradient of 'hpo'
within the same program step, raises ValueError.
"""

import torch

import mlodsl as ml

w = torch.nn.Parameter(torch.zeros(3))
lam = torch.nn.Parameter(torch.zeros(3))
calls = []


@ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
def classifier(hpo):
    calls.append(len(calls) + 1)
    if len(calls) == 2:
        raise ValueError("second evaluation")
    return (w - 1).pow(2).sum() + (hpo.exp() * w.pow(2)).sum()


@ml.level(upper_of="classifier", module=lam, optimizer=torch.optim.SGD([lam], lr=0.1))
def hpo(classifier):
    return (classifier - 2).pow(2).sum()


def build():
    calls.clear()
    return ml.program(classifier, hpo)
