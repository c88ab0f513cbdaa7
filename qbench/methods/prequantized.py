"""The shared base of methods that judge a checkpoint already quantized by a library (compressed-tensors, GPTQ, AWQ,
FP8): nothing is quantized at load time, the checkpoint's own ``quantization_config`` says how its tensors are laid
out, and transformers loads it through that config, the path a user's GLM-4 W4A16/GPTQ/AWQ/FP8 release takes.

A subclass of :class:`Prequantized` declares

* ``quant_methods``: the ``quantization_config.quant_method`` values it reads (``("compressed-tensors",)``);
* ``checkpoint_kind``: the checkpoint's kind in words, for messages (``"compressed-tensors W4A16"``);
* ``library``: the import name, distribution, minimum version and pip extra of the library transformers needs to
  load it (``unavailable`` names the extra when it is missing), or None;
* ``shipped``: the checkpoint qbench ships of a zoo model, by zoo id, as a folder under ``qbench/models/data``
  (``{"glm-tiny": "glm-tiny-ct-w4a16"}``), made from that model (its ``PROVENANCE.json`` says how);
* :meth:`Prequantized.config_problem`: why a checkpoint's ``quantization_config`` (its dict) is not one this method
  reads (wrong format, bits, group size), one line with the fix; None when it is;

and may extend :meth:`Prequantized.prepare` (what to do with the model after ``from_pretrained``),
``quantized_modules`` and ``left_unquantized``.

Which checkpoint a case loads, for ``--model M``:

* M has a ``quantization_config`` that :meth:`config_problem` accepts: M itself. Its reference is scored on
  ``--reference-model FULL`` (the full-precision checkpoint M was made from); without one, on M itself, so drift
  then shows the compute path only (``qbench run`` says so);
* M is a zoo model with a shipped quantized counterpart (glm-tiny): that counterpart, judged against M's own
  full-precision reference, so ``qbench run --model glm-tiny --method ct-w4a16`` needs no other argument;
* anything else is refused before any model loads (``checkpoint_problem``), with the fix: a checkpoint without a
  ``quantization_config`` (there is nothing quantized to judge), one of another library or format, a ChatGLM3 one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from qbench.errors import UsageError
from qbench.methods.libraries import library_problem
from qbench.methods.registry import LoadRequest, Method, torch_dtype
from qbench.methods.sizing import WeightFormat
from qbench.models.loading import is_chatglm, load_causal_lm
from qbench.models.zoo import DATA_DIR, ZOO


def quantization_config(path: Path) -> dict | None:
    """The ``quantization_config`` of the checkpoint directory ``path`` (from its config.json), None when it has
    none or no readable config.json."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc if isinstance(qc, dict) and qc else None


def quant_method(qc: dict | None) -> str | None:
    """A quantization_config's ``quant_method``, lower-cased (None: no config)."""
    return None if qc is None else str(qc.get("quant_method", "")).lower() or None


class Prequantized(Method):
    """A method that loads a checkpoint quantized beforehand (see the module docstring)."""

    quant_methods: ClassVar[tuple[str, ...]]
    checkpoint_kind: ClassVar[str]
    library: ClassVar[tuple[str, str, str, str] | None] = None  # (module, distribution, minimum version, extra)
    shipped: ClassVar[dict[str, str]] = {}  # zoo id → folder under qbench/models/data
    # Where the shipped folders live (tests point it elsewhere).
    shipped_root: ClassVar[Path] = DATA_DIR

    # ------------------------------------------------------------------------------------------------ availability

    def unavailable(self, device: str) -> str | None:
        if self.library is not None and (why := library_problem(*self.library)) is not None:
            return why
        return self.device_problem(device)

    def device_problem(self, device: str) -> str | None:
        """Why the library cannot run this format on ``device`` (None: it can)."""
        return None

    def responsible(self) -> str:
        """The checkpoint's library (its ``library``), through transformers."""
        if self.library is not None:
            from qbench.env import distribution_version

            version = distribution_version(self.library[1]) or "(not installed)"
            return f"{self.library[1]} {version} through " + super().responsible()
        return super().responsible()

    # ------------------------------------------------------------------------------------------ which checkpoint

    def shipped_checkpoint(self, path: Path) -> Path | None:
        """The quantized checkpoint qbench ships made from the zoo model at ``path``; None when there is none."""
        resolved = Path(path).resolve()
        for zoo_id, folder in self.shipped.items():
            entry = ZOO.get(zoo_id)
            if entry is None:
                continue
            try:
                source = entry.build().resolve()
            except UsageError:  # glm-tiny missing from the package: no match (zoo.resolve says why)
                continue
            if source == resolved:
                return self.shipped_root / folder
        return None

    def checkpoint_for(self, path: Path) -> Path:
        """The checkpoint a case of this method on ``--model path`` loads (see the module docstring)."""
        if quantization_config(path) is None and (shipped := self.shipped_checkpoint(path)) is not None:
            return shipped
        return Path(path)

    def stored_checkpoint(self, path: Path) -> Path | None:
        return self.checkpoint_for(path)

    def config_problem(self, qc: dict) -> str | None:
        """Why this method does not read a checkpoint with quantization_config ``qc`` (one line with the fix)."""
        raise NotImplementedError

    def checkpoint_problem(self, path: Path) -> str | None:
        if is_chatglm(path):
            return (
                f"{self.name} reads {self.checkpoint_kind} checkpoints; {path} is a ChatGLM3-format one: use "
                "chatglm-int8/int4 for ChatGLM's own quantization, or convert it (`qbench convert`) and quantize it"
            )
        qc = quantization_config(path)
        if qc is None:
            shipped = self.shipped_checkpoint(path)
            if shipped is not None:
                if not (shipped / "config.json").is_file():
                    return (
                        f"the {self.checkpoint_kind} checkpoint qbench ships for {path.name} is missing ({shipped}); "
                        "reinstall qbench or remake it (`nox -s make-checkpoints`)"
                    )
                return self.config_problem(quantization_config(shipped) or {})
            return (
                f"{path} has no quantization_config: {self.name} judges a checkpoint already quantized "
                f"({self.checkpoint_kind}); pass that checkpoint with --model and this one with --reference-model, "
                f"or use a method that quantizes at load time"
            )
        if quant_method(qc) not in self.quant_methods:
            return (
                f"{self.name} reads {self.checkpoint_kind} checkpoints (quant_method "
                f"{' or '.join(map(repr, self.quant_methods))}); {path} has quant_method {quant_method(qc)!r}: "
                "pass a checkpoint of that kind, or the method that reads this one (`qbench methods`)"
            )
        return self.config_problem(qc)

    # ------------------------------------------------------------------------------------------------------ loading

    def load(self, req: LoadRequest):
        path = self.checkpoint_for(req.path)
        # No quantization_config argument: transformers reads the checkpoint's own (loading.load_causal_lm).
        model = load_causal_lm(path, req.device, torch_dtype(req.compute_dtype), **req.load_kwargs())
        self.prepare(model)
        return model

    def prepare(self, model) -> None:
        """Called on the loaded model before it is measured (nothing by default)."""

    # ------------------------------------------------------------------------------------------------- size model
    # gptq, awq, fp8: the checkpoint's quantization_config fixes the layout (qbench.methods.prequantized_sizing).

    def weight_format(self, compute_dtype: str, device: str) -> WeightFormat:
        from qbench.methods.prequantized_sizing import QUANT_METHODS

        if self.family not in QUANT_METHODS:  # a layout prequantized_sizing does not know: no size model
            return super().weight_format(compute_dtype, device)
        return WeightFormat(self.name, compute_dtype, self.family)

    def prequantized_layout(self, config, fmt: WeightFormat):
        from qbench.methods import prequantized_sizing

        # a config without its own: the recipe of the checkpoint qbench ships (gptq)
        shipped = [quantization_config(self.shipped_root / f) for f in self.shipped.values()]
        return prequantized_sizing.from_config(fmt.scheme, config, default=next(filter(None, shipped), None))

    def stored_bytes(self, stored: int | None, kept: int) -> int | None:
        return kept  # the checkpoint holds the quantized tensors as they load (no buffers)
