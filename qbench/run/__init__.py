"""The run layer: cases executed (in process or each in its own), planned onto devices, measured and judged.

The doors (CLI, pytest plugin) call :func:`run_cases` with a :class:`RunConfig`; progress comes back through the
``progress`` callback, never by importing a door.
"""

from qbench.run.config import DEFAULT_METHODS, DRIFT_METHODS, RunConfig, config_doc
from qbench.run.context import ModelContext, prepare_model
from qbench.run.devices import check_plan, device_plan
from qbench.run.engine import RESULTS_SCHEMA, execute_case, run_cases
from qbench.run.judging import judge_case
from qbench.run.measuring import measure_case
from qbench.run.outcome import error_result
from qbench.run.reference import score_reference

__all__ = [
    "DEFAULT_METHODS",
    "DRIFT_METHODS",
    "RESULTS_SCHEMA",
    "ModelContext",
    "RunConfig",
    "check_plan",
    "config_doc",
    "device_plan",
    "error_result",
    "execute_case",
    "judge_case",
    "measure_case",
    "prepare_model",
    "run_cases",
    "score_reference",
]
