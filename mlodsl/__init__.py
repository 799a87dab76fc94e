"""mlodsl: multilevel optimization in PyTorch as decorated plain functions.

Example:
    >>> import mlodsl as ml
    >>> @ml.level(module=net, optimizer=opt, data=train_loader)
    ... def classifier(batch, hpo): ...
    >>> @ml.level(upper_of="classifier", grad="cg", module=wd, optimizer=hpo_opt, data=val)
    ... def hpo(batch, classifier): ...
    >>> program = ml.program(classifier, hpo)
    >>> program.run(steps=1000)
"""

from mlodsl import errors, hypergrad
from mlodsl.check import HypergradCheck, check_hypergrad
from mlodsl.compile import Schedule
from mlodsl.dsl import Level, level
from mlodsl.errors import MlodslError, TraceError
from mlodsl.history import History
from mlodsl.hooks import Hook
from mlodsl.program import Program, program

__version__ = "0.1.0"

__all__ = [
    "HypergradCheck", "check_hypergrad", "Hook", "History", "Level", "MlodslError", "Program", "Schedule", "TraceError", "errors",
    "hypergrad", "level", "program",
]
