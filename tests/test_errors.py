"""Trace-time and runtime errors: each bad program in ``tests/programs`` raises one clear error.

Every message is checked for the level it is about, the ``file:line`` where that level was
defined (the exact line, found independently from the program's source), and the helpful part:
"did you mean", what exists instead, the cycle path, the fix.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import re
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch

import mlodsl as ml
from mlodsl import errors
from programs import (
    bad_distributed,
    cycle,
    decorated_twice,
    dict_without_loss,
    duplicate_names,
    float_loss,
    foreign_optimizer,
    iterator_data,
    lower_ignores_upper,
    missing_module,
    missing_optimizer,
    non_scalar_loss,
    not_a_level,
    raising_level,
    raising_lower,
    shared_parameter,
    tensor_tuple_data,
    unknown_grad,
    unknown_parameter,
    unknown_upper,
    unroll_over_implicit,
    upper_ignores_lower,
)

PROGRAMS_DIR = Path(__file__).parent / "programs"
GOOD_PROGRAMS = ("chain3", "two_lowers", "two_uppers")


def _code_objects(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def line_of(path: Path, function: str) -> int:
    """Line where ``function`` is defined in ``path`` (its first decorator, as Python counts)."""
    code = compile(path.read_text(), str(path), "exec")
    lines = [c.co_firstlineno for c in _code_objects(code) if c.co_name == function]
    assert len(lines) == 1, f"{function} is defined {len(lines)} times in {path}"
    return lines[0]


def at(module: types.ModuleType, function: str) -> str:
    """Regex for the ``file:line`` of ``function`` in ``module``, relative or absolute path."""
    path = Path(module.__file__)
    return rf"[^\s(),]*{re.escape(path.name)}:{line_of(path, function)}(?!\d)"


# -- the error classes -------------------------------------------------------------------------

TRACE_ERRORS = (
    errors.AlreadyDecoratedError, errors.UnknownLevelError, errors.UnknownParameterError,
    errors.DuplicateLevelError, errors.CycleError, errors.MissingModuleError,
    errors.MissingOptimizerError, errors.SharedParameterError, errors.UnknownGradMethodError,
    errors.InvalidLevelError,
)
RUNTIME_ERRORS = (errors.LossError, errors.NoDependencyError, errors.HypergradError,
                  errors.NonFiniteError)


@pytest.mark.parametrize("cls", TRACE_ERRORS, ids=lambda c: c.__name__)
def test_trace_errors_subclass_trace_error_and_mlodsl_error(cls):
    assert issubclass(cls, errors.TraceError)
    assert issubclass(cls, errors.MlodslError)
    assert issubclass(cls, ml.TraceError) and issubclass(cls, ml.MlodslError)


@pytest.mark.parametrize("cls", RUNTIME_ERRORS, ids=lambda c: c.__name__)
def test_runtime_errors_are_mlodsl_errors_not_trace_errors(cls):
    assert issubclass(cls, errors.LevelRuntimeError)
    assert issubclass(cls, errors.MlodslError)
    assert not issubclass(cls, errors.TraceError)


def test_every_error_class_in_errors_is_covered():
    defined = {obj for obj in vars(errors).values()
               if isinstance(obj, type) and issubclass(obj, errors.MlodslError)}
    bases = {errors.MlodslError, errors.TraceError, errors.LevelRuntimeError}
    missing = {errors.MissingDependencyError}  # optional extras; tested in test_viz/test_log
    launched = {errors.DistributedError}  # needs several processes: tests/test_distributed.py
    assert defined == set(TRACE_ERRORS) | set(RUNTIME_ERRORS) | bases | missing | launched


# -- the program modules -----------------------------------------------------------------------

ALL_PROGRAMS = sorted(p.stem for p in PROGRAMS_DIR.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", ALL_PROGRAMS)
def test_importing_a_program_module_never_raises_and_it_has_build(name):
    module = importlib.import_module(f"programs.{name}")
    assert callable(module.build)


@pytest.mark.parametrize("name", GOOD_PROGRAMS)
def test_good_programs_trace_and_run(name):
    module = importlib.import_module(f"programs.{name}")
    program = module.build()
    expected = {
        "chain3": {("mid", "low"), ("top", "mid")},
        "two_lowers": {("hpo", "a"), ("hpo", "b")},
        "two_uppers": {("left", "low"), ("right", "low")},
    }[name]
    assert {(e.upper, e.lower) for e in program.edges} == expected
    history = program.run(steps=3)
    for node in program.levels:
        losses = [float(r["loss"]) for r in history[node.name]]
        assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for upper in {e.upper for e in program.edges}:
        grads = program.hypergrad(upper)
        assert any(bool(g.abs().sum() > 0) for g in grads)
    # build() returns a fresh program each call: a new one has not run.
    assert module.build().steps["program"] == 0


# -- trace-time errors: raised by ml.program(...) ----------------------------------------------

def test_unknown_upper_of_suggests_the_close_name_and_lists_the_traced_levels():
    with pytest.raises(
        errors.UnknownLevelError,
        match=rf"level 'hpo' \({at(unknown_upper, 'hpo')}\) is upper_of 'clasifier', but no "
              r"level with that name was traced\. Did you mean 'classifier'\? "
              r"Traced levels: classifier, hpo\. Pass every level to ml\.program",
    ):
        unknown_upper.build()


def test_unknown_parameter_suggests_the_level_name_and_lists_what_exists():
    with pytest.raises(
        errors.UnknownParameterError,
        match=rf"level 'hpo' \({at(unknown_parameter, 'hpo')}\) has a parameter 'clasifier'"
              r".*Did you mean 'classifier'\?.*'batch', the name of a traced level "
              r"\(classifier, hpo\), or a reserved name \(step, epoch, global_step\)"
              r".*give 'clasifier' a default value",
    ):
        unknown_parameter.build()


def test_duplicate_level_names_cite_both_definitions():
    with pytest.raises(
        errors.DuplicateLevelError,
        match=rf"two levels are named 'a': one defined at {at(duplicate_names, 'first')}, "
              rf"one at {at(duplicate_names, 'second')}\. Rename one with "
              r"@ml\.level\(name=\.\.\.\)",
    ):
        duplicate_names.build()


def test_cycle_reports_the_path_and_every_level_on_it():
    with pytest.raises(
        errors.CycleError,
        match=r"the upper_of relation has a cycle: a -> b -> c -> a \(each upper_of the next\)"
              rf"\. Levels involved: a \({at(cycle, 'a')}\), b \({at(cycle, 'b')}\), "
              rf"c \({at(cycle, 'c')}\)\. Remove one of these upper_of entries",
    ):
        cycle.build()


def test_missing_optimizer_names_the_level_and_the_fix():
    with pytest.raises(
        errors.MissingOptimizerError,
        match=rf"level 'hpo' \({at(missing_optimizer, 'hpo')}\) has no optimizer\. "
              r"Pass optimizer=torch\.optim\.SGD\(\.\.\.\)",
    ):
        missing_optimizer.build()


def test_missing_module_names_the_level_and_the_fix():
    with pytest.raises(
        errors.MissingModuleError,
        match=rf"level 'hpo' \({at(missing_module, 'hpo')}\) has no module: nothing for it to "
              r"train\. Pass module=<nn\.Module, Parameter, or list/dict of parameters>",
    ):
        missing_module.build()


def test_shared_parameter_names_both_levels_and_the_tensor():
    with pytest.raises(
        errors.SharedParameterError,
        match=rf"levels 'classifier' \({at(shared_parameter, 'classifier')}\) and 'hpo' "
              rf"\({at(shared_parameter, 'hpo')}\) both train a parameter of shape \(3,\); each "
              r"tensor must belong to one level\. Give each level its own parameters",
    ):
        shared_parameter.build()


def test_optimizer_over_another_levels_parameter():
    with pytest.raises(
        errors.SharedParameterError,
        match=rf"level 'classifier' \({at(foreign_optimizer, 'classifier')}\): its optimizer "
              r"updates 1 tensor\(s\) that are not in its module; the first, of shape \(3,\), is "
              rf"trained by level 'hpo' \({at(foreign_optimizer, 'hpo')}\)\. "
              r"Build the optimizer over this level's own parameters only",
    ):
        foreign_optimizer.build()


def test_one_shot_iterator_data():
    with pytest.raises(
        errors.InvalidLevelError,
        match=rf"level 'regressor' \({at(iterator_data, 'regressor')}\) has data of type "
              r"generator, an iterator that can be read only once.*Pass a re-iterable "
              r"\(a DataLoader, a list of batches\) or a callable that returns a batch",
    ):
        iterator_data.build()


def test_tuple_of_tensors_data():
    with pytest.raises(
        errors.InvalidLevelError,
        match=rf"level 'regressor' \({at(tensor_tuple_data, 'regressor')}\) has data that is a "
              r"tuple of tensors, which would be iterated element by element\. To use the same "
              r"batch every step pass data=lambda: batch",
    ):
        tensor_tuple_data.build()


# A list of tensors is a list of batches; only the (X, y) tuple idiom is refused.
def test_list_of_tensor_batches_is_accepted():
    w = torch.nn.Parameter(torch.zeros(3))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1),
              data=[torch.ones(3), 2 * torch.ones(3)])
    def regressor(batch):
        return (w - batch).pow(2).sum()

    history = ml.program(regressor).run(steps=3)
    assert len(history["regressor"]) == 3


def test_non_level_passed_to_program_names_the_function_and_where_it_is_defined():
    with pytest.raises(
        errors.InvalidLevelError,
        match=rf"ml\.program argument 2 is the plain function 'hpo' \({at(not_a_level, 'hpo')}\), "
              r"not a level; decorate the function with @ml\.level\(\.\.\.\) and pass the "
              r"decorated function",
    ):
        not_a_level.build()


def test_non_level_value_passed_to_program():
    with pytest.raises(errors.InvalidLevelError, match=r"argument 1 is int\b.*, not a level"):
        ml.program(3)
    with pytest.raises(errors.InvalidLevelError, match=r"needs at least one level"):
        ml.program()


# -- errors raised while @ml.level runs (so inside build()) -------------------------------------

def test_unknown_grad_method_suggests_cg_and_lists_the_methods():
    with pytest.raises(
        errors.UnknownGradMethodError,
        match=rf"level 'hpo' \({at(unknown_grad, 'hpo')}\): grad='cgg' is not a hypergradient "
              r"method\. Did you mean 'cg'\? Known methods: cg, neumann, finite_diff, darts, "
              r"exact",
    ):
        unknown_grad.build()


def test_unrolling_a_level_that_uses_an_implicit_method_names_both_and_the_fixes():
    with pytest.raises(
        errors.InvalidLevelError,
        match=rf"level 'top' \({at(unroll_over_implicit, 'top')}\) unrolls 'mid' "
              r"\(grad='unroll'\), but 'mid' computes its own hypergradient through 'low' with "
              r"grad='cg'; differentiating through an implicit hypergradient is not supported\. "
              r"Use grad='unroll' on 'mid' too \(nested unrolling\), or an implicit method such "
              r"as grad='exact' on 'top'\.",
    ):
        unroll_over_implicit.build()


def test_decorating_a_level_twice():
    with pytest.raises(
        errors.AlreadyDecoratedError,
        match=rf"level 'classifier' \({at(decorated_twice, 'classifier')}\) is decorated with "
              r"@ml\.level twice; keep a single @ml\.level\(\.\.\.\) and merge the arguments",
    ):
        decorated_twice.build()


def test_bad_distributed_option():
    with pytest.raises(
        errors.TraceError,
        match=r"distributed must be 'ddp' \(or True\), ml.distributed.ddp\(\.\.\.\), False "
              r"\(never\) or None \(automatic: .*got 'fsdp'",
    ):
        bad_distributed.build()


# -- runtime errors: the program traces, then fails at its first run or hypergradient --------

def _upper_ignores_lower_pattern() -> str:
    return (rf"level 'hpo' \({at(upper_ignores_lower, 'hpo')}\) is upper_of 'classifier', but "
            r"its loss does not depend on 'classifier' or on any level below it, so its "
            r"hypergradient through 'classifier' is zero\. Read the lower level in the loss")


def test_upper_that_ignores_its_lower_fails_at_first_run():
    program = upper_ignores_lower.build()
    with pytest.raises(errors.NoDependencyError, match=_upper_ignores_lower_pattern()):
        program.run(steps=1)


def test_upper_that_ignores_its_lower_fails_at_hypergrad():
    program = upper_ignores_lower.build()
    with pytest.raises(errors.NoDependencyError, match=_upper_ignores_lower_pattern()):
        program.hypergrad("hpo")


def _lower_ignores_upper_pattern() -> str:
    return (rf"level 'classifier' \({at(lower_ignores_upper, 'classifier')}\) is below 'hpo', "
            r"but its loss does not read .*'hpo'.*the implicit hypergradient is zero\. "
            r"Use 'hpo' in .*'classifier'.*\(add a parameter named 'hpo'\), or remove the "
            r"upper_of edge")


def test_lower_that_ignores_its_upper_fails_at_first_run():
    program = lower_ignores_upper.build()
    with pytest.raises(errors.NoDependencyError, match=_lower_ignores_upper_pattern()):
        program.run(steps=1)


def test_lower_that_ignores_its_upper_fails_at_hypergrad():
    program = lower_ignores_upper.build()
    with pytest.raises(errors.NoDependencyError, match=_lower_ignores_upper_pattern()):
        program.hypergrad("hpo")


def _step_note(module: types.ModuleType, level: str, step: int, program_step: int) -> str:
    return (rf"mlodsl: while running level '{level}' \({at(module, level)}\) at its step "
            rf"{step} \(program step {program_step}\)")


def _single_note(error: BaseException) -> str:
    notes = getattr(error, "__notes__", [])
    mlodsl_notes = [n for n in notes if n.startswith("mlodsl: ")]
    assert len(mlodsl_notes) == 1, notes
    return mlodsl_notes[0]


def test_non_scalar_loss():
    program = non_scalar_loss.build()
    with pytest.raises(
        errors.LossError,
        match=rf"level 'regressor' \({at(non_scalar_loss, 'regressor')}\) returned a loss of "
              r"shape \(3,\); it must be a scalar\. Reduce it, e\.g\. with \.mean\(\) or "
              r"\.sum\(\)",
    ) as info:
        program.run(steps=1)
    assert re.fullmatch(_step_note(non_scalar_loss, "regressor", 1, 1), _single_note(info.value))


def test_dict_without_loss_lists_its_keys():
    program = dict_without_loss.build()
    with pytest.raises(
        errors.LossError,
        match=rf"level 'regressor' \({at(dict_without_loss, 'regressor')}\) returned a dict "
              r"without a 'loss' entry \(keys: objective, norm\); a level function must return "
              r"a scalar loss tensor or a dict with a 'loss' entry",
    ) as info:
        program.run(steps=1)
    assert re.fullmatch(_step_note(dict_without_loss, "regressor", 1, 1),
                        _single_note(info.value))


def test_float_loss():
    program = float_loss.build()
    with pytest.raises(
        errors.LossError,
        match=rf"level 'regressor' \({at(float_loss, 'regressor')}\) returned a float "
              r"\(3\.0\); a level function must return a scalar loss tensor",
    ) as info:
        program.run(steps=1)
    assert re.fullmatch(_step_note(float_loss, "regressor", 1, 1), _single_note(info.value))


def test_exception_inside_a_level_keeps_its_type_and_gets_a_note():
    program = raising_level.build()
    with pytest.raises(ValueError, match=r"^negative label -1") as info:
        program.run(steps=5)
    assert str(info.value) == "negative label -1"  # the message itself is untouched
    # The user's own exception passes through unchanged, with a note naming the level, where it
    # was defined and the step (the third batch is the bad one).
    assert type(info.value) is ValueError
    assert re.fullmatch(_step_note(raising_level, "regressor", 3, 3), _single_note(info.value))
    assert program.steps == {"program": 3, "regressor": 2}


def test_exception_in_a_lower_during_a_hypergradient_names_the_upper():
    program = raising_lower.build()
    with pytest.raises(ValueError, match=r"^second evaluation") as info:
        program.run(steps=1)
    assert str(info.value) == "second evaluation"
    # The lower has finished its step 1 and is re-evaluated for the upper's hypergradient.
    assert re.fullmatch(rf"mlodsl: while running level 'classifier' "
                        rf"\({at(raising_lower, 'classifier')}\) for the hypergradient of 'hpo' "
                        r"after its step 1 \(program step 1\)", _single_note(info.value))


# -- the decorator -----------------------------------------------------------------------------

_weight = torch.nn.Parameter(torch.zeros(3))


@ml.level(module=_weight, optimizer=torch.optim.SGD([_weight], lr=0.1))
def documented(batch, hpo=None, *, scale: float = 2.0) -> torch.Tensor:
    """Squared distance of the weight to the batch."""
    return scale * (_weight - batch).pow(2).sum()


def _plain(batch, hpo=None, *, scale: float = 2.0) -> torch.Tensor:
    """Squared distance of the weight to the batch."""
    return scale * (_weight - batch).pow(2).sum()


def test_level_is_still_callable_as_the_plain_function():
    batch = torch.ones(3)
    assert torch.equal(documented(batch), _plain(batch))
    assert torch.equal(documented(batch, scale=0.5), _plain(batch, scale=0.5))
    assert torch.equal(documented(batch=batch), _plain(batch=batch))


def test_level_keeps_signature_docstring_and_name():
    assert inspect.signature(documented) == inspect.signature(_plain)
    assert documented.__doc__ == "Squared distance of the weight to the batch."
    assert documented.__name__ == "documented"
    assert documented.__qualname__ == "documented"
    assert documented.__module__ == __name__
    assert isinstance(documented, ml.Level)
    assert documented.level_name == documented.spec.name == "documented"


def test_level_records_where_it_was_defined():
    path, line = documented.defined_at.rsplit(":", 1)
    assert Path(path).resolve() == Path(__file__).resolve()
    assert int(line) == line_of(Path(__file__), "documented")
    assert Path(__file__).read_text().splitlines()[int(line) - 1].startswith("@ml.level(")
    assert documented.spec.defined_at == documented.defined_at
    assert documented.defined_at in repr(documented)


def _notebook_cell():
    """A cell a user re-runs: defines two levels and a program from scratch."""
    w = torch.nn.Parameter(torch.zeros(3))
    lam = torch.nn.Parameter(torch.zeros(3))

    @ml.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def classifier(hpo):
        return (w - 1).pow(2).sum() + (hpo.exp() * w.pow(2)).sum()

    @ml.level(upper_of="classifier", module=lam, optimizer=torch.optim.SGD([lam], lr=0.1))
    def hpo(classifier):
        return (classifier - 2).pow(2).sum()

    return classifier, hpo


def _mlodsl_container_sizes() -> dict[tuple[str, str], int]:
    """Sizes of every dict/list/set held at module level anywhere in mlodsl."""
    sizes = {}
    for module_name, module in list(sys.modules.items()):
        if module_name == "mlodsl" or module_name.startswith("mlodsl."):
            for attribute, value in vars(module).items():
                if isinstance(value, (dict, list, set)):
                    sizes[(module_name, attribute)] = len(value)
    return sizes


def test_rerunning_a_cell_creates_independent_levels_and_registers_nothing():
    before = _mlodsl_container_sizes()
    cells = [_notebook_cell() for _ in range(2)]
    assert _mlodsl_container_sizes() == before

    (classifier1, hpo1), (classifier2, hpo2) = cells
    assert classifier1 is not classifier2 and hpo1 is not hpo2
    assert classifier1.spec.module is not classifier2.spec.module
    assert classifier1.defined_at == classifier2.defined_at  # same source, separate levels

    # Each cell's levels make a program of exactly those two levels: the earlier run of the
    # cell is not picked up, and nothing is duplicated.
    for classifier, hpo in cells:
        program = ml.program(classifier, hpo)
        assert [n.name for n in program.levels] == ["classifier", "hpo"]
        assert program.level("classifier").module is classifier.spec.module
        program.run(steps=1)
    assert _mlodsl_container_sizes() == before

    # Mixing the two runs is an explicit duplicate, never a silent merge.
    with pytest.raises(errors.DuplicateLevelError, match=r"two levels are named 'classifier'"):
        ml.program(classifier1, hpo1, classifier2)

    # Nothing global keeps a level alive.
    refs = [weakref.ref(level) for cell in cells for level in cell]
    del cells, classifier1, hpo1, classifier2, hpo2, classifier, hpo, program
    gc.collect()
    assert all(ref() is None for ref in refs)
