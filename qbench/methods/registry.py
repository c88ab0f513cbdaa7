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
from qbench.methods.sizing import WeightFormat

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
    # Whether a row of a batch computes the same whatever the other rows hold: then the greedy prompts of equal length
    # run as one batch (qbench.quality.tasks.continuations). False where the quantized matmul looks across the batch.
    rows_independent: ClassVar[bool] = True
    # Absolute quality bounds against the full-precision reference (qbench.case.Bound), with provenance.
    quality_bounds: ClassVar[tuple] = ()
    # The distribution whose code quantizes the weights (pip's name), named with its version in a verdict's reason
    # when a weight it is meant to quantize stays in full precision; None: transformers' own (or qbench's) code.
    distribution: ClassVar[str | None] = None

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

    def stored_checkpoint(self, path: Path) -> Path | None:
        """For a method that loads a pre-quantized checkpoint: the one a case on ``--model path`` loads (compared with
        its reference's tensor names, qbench.models.completeness); None for a method that quantizes as it loads."""
        return None

    def quantized_modules(self, model: PreTrainedModel) -> list[str]:
        """Names of the modules this method replaced with quantized ones (empty for references)."""
        return []

    def left_unquantized(self, model: PreTrainedModel) -> list[str]:
        """Names of modules this method should have quantized but that are still plain full-precision ones."""
        return []

    def responsible(self) -> str:
        """Whose code quantized (or failed to quantize) the weights, with versions: ``bitsandbytes 0.50.2 through
        transformers 5.25.0``."""
        from qbench.env import distribution_version

        who = [f"{d} {distribution_version(d) or '(not installed)'}" for d in (self.distribution, "transformers") if d]
        return " through ".join(who)

    # The fix a verdict names when this method leaves a MoE model's routed experts (transformers' fused 3-D expert
    # parameters) in full precision: first what to do, then why this library does not (each family says its own).
    EXPERTS_FIX: ClassVar[str] = (
        "use a method that quantizes fused 3-D expert parameters (`qbench methods --model MODEL` lists them) or a "
        "checkpoint whose experts are stored quantized"
    )
    experts_why: ClassVar[str] = "qbench knows of no way this library quantizes them"

    def experts_fix(self) -> str:
        """The fix, and why this library leaves the fused experts (with the versions of :meth:`responsible`)."""
        return f"{self.EXPERTS_FIX} ({self.responsible()}: {self.experts_why})"

    # ------------------------------------------------------------------------------------------------- size model
    # What the pre-flight estimate (qbench.measure) asks of a method; the defaults are an unquantized model's, each
    # family module overrides what is its own. Where a figure has a note, the hook returns (bytes, note).

    def weight_format(self, compute_dtype: str, device: str) -> WeightFormat:
        """The layout of this method's weights in ``compute_dtype`` on ``device``, from its own settings."""
        if not self.quantized:
            return WeightFormat(self.name, compute_dtype, "none")
        raise UsageError(
            f"--method {self.name}: the estimate has no size model for the {self.family} family; "
            "give its method class a weight_format and the size hooks of qbench.methods.registry.Method"
        )

    def quantized_linears(self, model, fmt: WeightFormat) -> dict[str, tuple[int, int]]:
        """name → (out, in) of the linears of the meta ``model`` this method quantizes, decided as loading decides
        it (it may replace modules in ``model``)."""
        return {}

    def quantizes_fused_experts(self, fmt: WeightFormat) -> bool:
        """Whether this method also quantizes a MoE model's fused 3-D expert parameters (each expert's matrix sized
        as one ``[out, in]`` linear by :meth:`linear_bytes`); by default only what :meth:`quantized_linears` says."""
        return False

    def prequantized_layout(self, config, fmt: WeightFormat):
        """For a method that loads a pre-quantized checkpoint: the layout its quantization_config describes (an
        object with ``quantized_linears(model)`` and ``module_bytes(module, out, in)``); None for every other."""
        return None

    def code_book_bytes(self, fmt: WeightFormat) -> int:
        """Bytes of the lookup tables a model holds once (counted once, as ``weights_bytes`` does)."""
        return 0

    def linear_bytes(self, fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
        """(bytes of the quantized weight, bytes of its side data) for one ``[out, in]`` linear, code books aside."""
        raise ValueError(f"{fmt.scheme} quantizes no linear")

    def weight_transient(self, fmt: WeightFormat, largest: tuple[int, int], device: str) -> tuple[int, str]:
        """A weight-sized temporary in a forward, for the largest quantized ``[out, in]`` linear: (bytes, why)."""
        return 0, "none"

    def linear_temporaries(self, fmt: WeightFormat, largest: tuple[int, int], tokens: int) -> int:
        """Per-call temporaries of the largest quantized linear over ``tokens`` rows, beside the layer's own."""
        return 0

    def kernel_copy(
        self, fmt: WeightFormat, quantized: dict[str, tuple[int, int]], device: str, scale_dtype: str
    ) -> tuple[int, str]:
        """Bytes of a second, kernel-ready copy of the quantized linears (``quantized``: name → (out, in)) a decode
        kernel keeps beside them, with ``scale_dtype`` the dtype the scales are kept in: (bytes, why)."""
        return 0, "none"

    def runtime_extra_bytes(self, fmt: WeightFormat, device: str) -> int:
        """What this method adds to the process baseline on ``device`` (a library's import and kernels)."""
        return 0

    def stored_bytes(self, stored: int | None, kept: int) -> int | None:
        """Bytes of the checkpoint's tensors as stored: ``stored`` is the unquantized tensors in the dtype the config
        states (None: not stated), ``kept`` the tensors as this method keeps them, buffers aside."""
        return stored

    def load_extra(
        self, fmt: WeightFormat, largest: int, kept: int, unquantized: int, converts: bool, device: str
    ) -> tuple[int, int, str]:
        """What loading holds beside the overhead and the checkpoint pages: (the model held, the largest transient,
        note). ``largest``: elements of the largest quantized linear; ``kept``: the model as the method keeps it;
        ``unquantized``: the model in the compute dtype; ``converts``: the checkpoint is stored in another dtype."""
        return kept, 0, "weights load as they are kept"

    def loads_as_stored(self, fmt: WeightFormat, path_or_config) -> bool:
        """Whether ``path_or_config`` is a checkpoint already in this method's format, read as stored (no
        unquantized model while loading, scales in the checkpoint's dtype)."""
        return False

    def shard_blocks(self, fmt: WeightFormat, config) -> tuple[int, int] | None:
        """(rows per block along the output dim, columns per block along the input dim) of this method's stored
        quantized weights, which a tensor-parallel split must keep whole (qbench.measure.sharding); None where the
        scheme has no blocks a split must respect. By default what a pre-quantized checkpoint's layout says (its
        ``shard_blocks()``, where it has one), else None."""
        layout = self.prequantized_layout(config, fmt)
        blocks = getattr(layout, "shard_blocks", None)
        return blocks() if blocks is not None else None


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
