"""The switch behind mlodsl's faster routes to public torch functions (mlodsl.fastpath)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlodsl.fastpath import FastPath


def test_the_check_runs_once_and_again_after_use():
    calls = []
    path = FastPath(True, "MLODSL_TEST_UNSET_VARIABLE", lambda: calls.append(1) or True)
    assert path.in_use() and path.in_use()
    assert len(calls) == 1
    assert path.use(False) is True and not path.in_use()
    assert len(calls) == 1  # off: nothing to check
    path.use(True)
    assert path.in_use() and len(calls) == 2


def test_a_failed_check_turns_the_route_off_for_good():
    path = FastPath(True, "MLODSL_TEST_UNSET_VARIABLE", lambda: False)
    assert not path.in_use()
    assert not path.in_use()


def test_unavailable_entry_points_cannot_be_turned_on():
    path = FastPath(False, "MLODSL_TEST_UNSET_VARIABLE", lambda: True)
    path.use(True)
    assert not path.in_use()


@pytest.mark.parametrize("variable,probe", [
    ("MLODSL_PUBLIC_AUTOGRAD", "from mlodsl import autodiff; print(autodiff.engine_in_use())"),
    ("MLODSL_PUBLIC_VMAP", "from mlodsl import batching; print(batching.primitives_in_use())"),
])
@pytest.mark.parametrize("value,expected", [("1", "False"), ("0", "True")])
def test_environment_variables_turn_the_routes_off(variable, probe, value, expected):
    env = {**os.environ, variable: value}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == expected
