"""qbench: regression and benchmark suite for quantized GLM models.

The flow is one-way (see DESIGN.md): Case → load → quantize → workload → Measurements → compare with
Baseline → Verdict → Report. The CLI, the pytest plugin and the nox sessions are thin doors onto
:func:`qbench.run.engine.run_cases`.
"""

__version__ = "0.1.0"
