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

from mlodsl import distributed, errors, hypergrad, log, viz
from mlodsl.check import HypergradCheck, check_hypergrad
from mlodsl.compile import Schedule
from mlodsl.dsl import Level, level
from mlodsl.errors import MlodslError, TraceError
from mlodsl.history import History
from mlodsl.hooks import Hook
from mlodsl.checkpoint import CheckpointError
from mlodsl.program import Program, load, program
from mlodsl.validation import EarlyStopping

__version__ = "0.1.0"

__all__ = [
    "check_hypergrad", "CheckpointError", "distributed", "EarlyStopping", "errors", "History",
    "Hook",
    "hypergrad", "HypergradCheck", "level", "Level", "load", "log", "MlodslError", "Program",
    "program", "Schedule", "TraceError", "viz",
]
