"""Loading the scripts under ``examples/`` as modules, for the tests of each example."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (not a package: the scripts run as ``python examples/...``)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Torch on one thread for the duration of a block: the examples' own helper.
one_torch_thread = load_example("digits_noise").one_thread
