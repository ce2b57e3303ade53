"""Differential fuzzing of rematc: random models from a grammar, planned at several budgets.

``grammar.py`` turns an integer seed into a :class:`~tests.fuzz.grammar.ModelSpec`
(a readable list of blocks, a head and a loss) and builds it; ``check.py`` plans
it with ``Rockmate`` at three budgets and compares each step with eager
autograd (bitwise) and with the memory meter (exact peak); it also shrinks a
failing spec. ``test_fuzz.py`` is the CI tier, ``benchmarks/fuzz.py`` the CLI.
"""
