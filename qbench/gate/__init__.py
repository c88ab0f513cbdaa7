"""The gate for the user's own repository: ``pytest --pyargs qbench.gate`` runs every selected case (drift against
the stored baseline, speed and memory against the perf baseline, the integrity checks) as one test each.

What to gate comes from ``[tool.qbench]`` in the repository's ``pyproject.toml`` (:mod:`~qbench.gate.settings`), the
``--qbench-*`` options overriding it; ``qbench init`` writes a starting point (:mod:`~qbench.gate.scaffold`). The
test module is :mod:`qbench.gate.test_models`; the pytest plugin parametrizes it.
"""
