"""Loading a checkpoint directory with transformers' own classes: safetensors only, no remote code.

A ChatGLM3-format directory (model_type ``chatglm``) loads through :mod:`qbench.models.chatglm_checkpoint` as a
``GlmForCausalLM``; everything else through ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from pathlib import Path

from qbench.errors import UsageError


def is_chatglm(path: Path) -> bool:
    from qbench.models.chatglm_checkpoint import read_config

    return read_config(path) is not None


def chatglm_bits(path: Path) -> int | None:
    """The quantization_bit of a ChatGLM-format checkpoint (None: full precision or not ChatGLM's format)."""
    from qbench.models.chatglm_checkpoint import quantization_bits, read_config

    cc = read_config(path)
    return None if cc is None else quantization_bits(cc)


SAFETENSORS_INDEX = "model.safetensors.index.json"


def check_checkpoint_files(path: Path) -> None:
    """Every ``*.safetensors`` file of the checkpoint directory ``path`` readable and whole, before any case runs.

    Reads only each file's header: an 8-byte little-endian header length, that many bytes of JSON, and then the
    data, which must end exactly where the furthest tensor's ``data_offsets`` say (a download cut short or a
    half-written conversion does not). A sharded checkpoint's index must name only files that are there.
    """
    import json
    import struct

    fix = "re-download the checkpoint (or re-convert it with `qbench convert`)"
    path = Path(path)
    for f in sorted(path.glob("*.safetensors")):
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(8)
                (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
                raw = fh.read(n) if n is not None and 0 < n <= size - 8 else b""
        except PermissionError:
            raise UsageError(f"{f}: cannot be read (permission denied); fix its permissions") from None
        except OSError as e:
            raise UsageError(f"{f}: cannot be read ({e.strerror or e}); {fix}") from None
        if n is None or not raw:
            raise UsageError(f"{f}: not a safetensors file (no valid header in its {size} bytes); {fix}")
        try:
            header = json.loads(raw)
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
            raise UsageError(f"{f}: not a safetensors file (its header is not safetensors JSON); {fix}") from None
        expected = 8 + n + max(ends, default=0)
        if size != expected:
            what = "truncated" if size < expected else "longer than its header says"
            raise UsageError(f"{f}: {what} ({size:,} bytes, its header says {expected:,}); {fix}")
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{index}: not a safetensors index (no weight_map); {fix}") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise UsageError(f"{index}: names {len(missing)} file(s) not there ({', '.join(missing[:3])}); {fix}")


def load_causal_lm(path: Path, device: str, dtype, quantization_config=None, device_map=None, max_memory=None):
    """The model at ``path`` in ``dtype`` on ``device``, or spread over devices by ``device_map`` (an accelerate
    device map, module name → device) within ``max_memory``."""
    if is_chatglm(path):
        if quantization_config is not None:
            raise UsageError(
                f"--model {path}: a ChatGLM3-format checkpoint loads with qbench's ChatGLM reader, which takes no "
                f"transformers quantization config; convert it first: `qbench convert {path} DST`"
            )
        from qbench.models import chatglm_checkpoint

        return chatglm_checkpoint.load(path, device, dtype, device_map=device_map)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map=device if device_map is None else device_map,
        max_memory=max_memory,
        quantization_config=quantization_config,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
    )
    model.eval()
    return model


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if is_chatglm(path) and not (path / "tokenizer.json").is_file():
        raise UsageError(
            f"--model {path}: ChatGLM's sentencepiece tokenizer (tokenizer.model) loads only with remote code and "
            "qbench runs none; put a tokenizer.json (a fast tokenizer with the same vocabulary) in that directory"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
