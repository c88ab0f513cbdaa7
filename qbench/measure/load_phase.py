"""The load side of the pre-flight memory estimate: what loading a model holds at its peak, before the run starts.

From the config and the method's weight table alone: the dtype and size the checkpoint is stored in, the pages of the
memory-mapped checkpoint that stay in a CPU process's RSS, what is held while loading (the ChatGLM and hqq methods
load the model unquantized, then quantize it) and the largest load transient (bitsandbytes' compute-dtype copy,
hqq's solver, ChatGLM's rounding); and, for a prequantized ChatGLM checkpoint read as stored, its int tensors one at
a time. The runtime side is :mod:`qbench.measure.runtime`; :mod:`qbench.measure.estimate` takes the larger peak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qbench.measure.weights import DTYPE_BYTES, WeightFormat, WeightTable
from qbench.methods.chatglm import prequantized_bits  # noqa: F401  (re-exported: its old home)

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def checkpoint_dtype(config: PretrainedConfig) -> str | None:
    """The dtype the config says the checkpoint is stored in, as bf16 / fp16 / fp32 (None: not stated)."""
    stored = str(getattr(config, "dtype", None)).removeprefix("torch.")
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(stored)


def checkpoint_bytes(config: PretrainedConfig, table: WeightTable) -> int | None:
    """Size of the checkpoint's tensors in the dtype the config says they are stored in (None: not stated)."""
    dtype = checkpoint_dtype(config)
    return None if dtype is None else sum(t.numel * DTYPE_BYTES[dtype] for t in table.tensors if t.kind != "buffer")


def load_phase(config: PretrainedConfig, fmt: WeightFormat, table: WeightTable, device: str) -> dict:
    """The load peak without the runtime overhead, the checkpoint pages in RSS, and the pages the run keeps.

    transformers memory-maps safetensors checkpoints. On CPU, a tensor loaded in its stored dtype is the mapping
    itself (its pages are the weights); a converted or quantized tensor is a copy, and the pages read to make it
    stay in RSS while the file is mapped: until loading ends after a dtype conversion, and (measured with
    transformers 5.23) through the run when the method quantizes. These pages are reclaimable page cache, so they
    inflate RSS more than they risk an OOM; they do not exist in GPU memory.
    """
    from qbench import methods

    method = methods.get(fmt.method)  # its size model: what loading it holds (qbench.methods.registry.Method)
    largest = table.largest_quantized()
    n = largest[0] * largest[1] if largest else 0
    unquantized = sum(t.numel * fmt.dtype_bytes if t.kind != "buffer" else t.nbytes for t in table.tensors)
    stored = method.stored_bytes(
        checkpoint_bytes(config, table), table.total - sum(t.nbytes for t in table.tensors if t.kind == "buffer")
    )
    converts = stored is not None and stored != unquantized - sum(t.nbytes for t in table.tensors if t.kind == "buffer")
    quantizes = method.quantized
    pages = (stored or 0) if not device.startswith("cuda") and (converts or quantizes) else 0
    held, extra, note = method.load_extra(fmt, n, table.total, unquantized, converts, device)
    if pages:
        note += "; the memory-mapped checkpoint's pages count in RSS"
    return {"bytes": pages + held + extra, "pages": pages, "retained_pages": pages if quantizes else 0, "note": note}


def prequantized_load(table: WeightTable) -> dict:
    """The load phase of a prequantized ChatGLM checkpoint (:func:`prequantized_bits` equal to the method's bits), in
    :func:`load_phase`'s terms."""
    # qbench's ChatGLM reader builds the quantized modules from the stored int tensors, one at a time: the
    # model as kept, plus the largest tensor in flight; nothing unquantized ever exists.
    in_flight = max(t.nbytes for t in table.tensors)
    return {
        "bytes": table.total + in_flight,
        "pages": 0,
        "retained_pages": 0,
        "note": "a prequantized ChatGLM checkpoint: its int weights load as stored, one tensor at a time",
    }
