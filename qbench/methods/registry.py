"""The method registry: one decorator registers a method by name and refuses a duplicate.

Nothing outside this package branches on a method's name; callers ask the registry for a :class:`Method`
and use its interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from qbench.case import DTYPES, torch_dtype  # noqa: F401  (re-exported: methods' own vocabulary)
from qbench.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class LoadRequest:
    path: Path
    device: str  # a torch device string: "cpu", "cuda", "cuda:1"
    compute_dtype: str  # one of DTYPES
    # An accelerate device map (module name → device index, "cpu" or "disk") spreading the model over several
    # devices, already checked by qbench.run.plan; None puts the whole model on ``device``.
    device_map: dict | None = None
    max_memory: dict | None = None  # bytes per device, passed to from_pretrained with the device map

    def load_kwargs(self) -> dict:
        return {"device_map": self.device_map, "max_memory": self.max_memory}


class Method:
    """A way to load (and quantize) a checkpoint. Subclasses set the class attributes and ``load``."""

    name: ClassVar[str]
    family: ClassVar[str]
    description: ClassVar[str]
    quantized: ClassVar[bool] = True
    # The dtype activations are computed in unless the case says otherwise.
    default_compute_dtype: ClassVar[str] = "bf16"
    # Absolute quality bounds against the full-precision reference (qbench.case.Bound), with provenance.
    quality_bounds: ClassVar[tuple] = ()

    def load(self, req: LoadRequest) -> PreTrainedModel:
        raise NotImplementedError

    def unavailable(self, device: str) -> str | None:
        """Why this method cannot run on ``device`` here (one line: the missing library with its pip extra, or
        the missing kernel or device capability), or None if it can. A case of an unavailable method is
        ``skipped`` with this reason; nothing is loaded for it."""
        return None

    def checkpoint_problem(self, path: Path) -> str | None:
        """Why this method cannot load the checkpoint at ``path`` (one line, with the fix), or None if it can.

        By default a method loads transformers-format checkpoints only; ChatGLM3-format ones (model_type
        ``chatglm``) need converting first.
        """
        from qbench.models.loading import is_chatglm

        if is_chatglm(path):
            return (
                f"{self.name} loads transformers-format checkpoints; convert this ChatGLM3-format one first "
                f"(`qbench convert {path} DST`) or use a method that reads it (bf16, fp16, fp32, chatglm-int8/int4)"
            )
        return None

    def quantized_modules(self, model: PreTrainedModel) -> list[str]:
        """Names of the modules this method replaced with quantized ones (empty for references)."""
        return []

    def left_unquantized(self, model: PreTrainedModel) -> list[str]:
        """Names of modules this method should have quantized but that are still plain full-precision ones."""
        return []


_REGISTRY: dict[str, Method] = {}
# Names --method reads as groups of methods (qbench.run.config.method_groups); no method may take one.
GROUP_NAMES = ("all", "drift")


def register(cls: type[Method]) -> type[Method]:
    if cls.name in GROUP_NAMES:
        raise ValueError(f"method {cls.name!r}: the name is a --method group ({', '.join(GROUP_NAMES)}); pick another")
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice ({_REGISTRY[cls.name].__class__} and {cls})")
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"--method {name}: unknown method; choose from {', '.join(names())}") from None


def names() -> list[str]:
    return list(_REGISTRY)
