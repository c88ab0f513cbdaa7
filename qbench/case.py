"""A case is one model × method × device × compute dtype, run on a workload."""

from __future__ import annotations

from dataclasses import dataclass


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
