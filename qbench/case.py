"""The case vocabulary every layer shares: a case (model × method × device × compute dtype), the compute dtypes,
the verdict statuses and a quality bound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qbench.errors import UsageError

if TYPE_CHECKING:
    import torch

PASS, DRIFT, REGRESSION, ERROR, SKIPPED = "pass", "drift", "regression", "error", "skipped"
FAILING = (DRIFT, REGRESSION, ERROR)

DTYPES = ("bf16", "fp16", "fp32")

# The results file's format and version, which every writer stamps (``qbench run --json``, ``--endpoint``) and the
# reader checks (qbench.report.results). It lives here, below both run/ and report/, because those two layers may not
# import each other. A change to the file's contract changes the version.
RESULTS_SCHEMA = "qbench.results/1"


def torch_dtype(name: str) -> torch.dtype:
    import torch

    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    except KeyError:
        raise UsageError(f"compute dtype {name!r} is not one of {', '.join(DTYPES)}") from None


def device_class(device: str) -> str:
    """The key baselines are stored under: ``cpu``, or ``cuda-sm<major><minor>`` (kernels differ by arch)."""
    if device.startswith("cuda"):
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return device.split(":")[0]


@dataclass(frozen=True)
class Case:
    model: str  # zoo id or the checkpoint directory's name
    method: str
    device: str
    compute_dtype: str
    default_dtype: bool = True  # compute dtype is the method's own default: leave it out of the id

    @property
    def id(self) -> str:
        """Readable id used for parametrize ids, baseline names and log lines: ``glm-tiny-bnb-nf4-cpu``."""
        parts = [self.model, self.method]
        if not self.default_dtype:
            parts.append(self.compute_dtype)
        parts.append(self.device.replace(":", ""))
        return "-".join(parts)


@dataclass(frozen=True)
class Bound:
    """``metric`` must stay at or below (``upper``) or at or above ``limit``; ``why`` gives its provenance."""

    metric: str
    limit: float
    upper: bool = True
    why: str = ""

    def violation(self, value: float | None) -> str | None:
        if value is None:
            return None
        ok = value <= self.limit if self.upper else value >= self.limit
        if ok and value == value:  # NaN never passes
            return None
        sign = ">" if self.upper else "<"
        return f"{self.metric} {value:.4g} {sign} {self.limit:.4g} allowed"
