"""Small good and bad mlodsl programs, one per module, each exposing ``build()``.

Importing a module never raises: a program whose mistake is caught when ``@ml.level`` runs
decorates its levels inside ``build()``. Bad programs reproduce one mistake each; the tests in
``tests/test_errors.py`` check the error ``build()`` (or running the built program) raises.

Good programs (``chain3``, ``two_lowers``, ``two_uppers``) decorate their levels inside
``build()`` so that every call returns a program with fresh parameters and optimizers.
"""
