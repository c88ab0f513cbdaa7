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

    kwargs = {}
    if quantization_config is not None:
        # Only when a method quantizes: an explicit None makes transformers ignore a pre-quantized checkpoint's own
        # quantization_config and load its packed tensors as "unexpected" beside uninitialised weights.
        kwargs["quantization_config"] = quantization_config
    model, info = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map=device if device_map is None else device_map,
        max_memory=max_memory,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
        output_loading_info=True,
        **kwargs,
    )
    check_loading_info(path, info)
    model.eval()
    return model


class CheckpointMismatch(Exception):
    """The checkpoint's tensors do not match the model built from its config: some weights would be left
    uninitialised (missing) or ignored (unexpected). The case is an ``error``, never a drift figure."""


def _names(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def mtp_keys(path: Path, keys) -> set[str]:
    """Of ``keys``, those of the checkpoint's MTP (next-token-prediction) layers: GLM-4.5 stores
    ``num_nextn_predict_layers`` of them after its decoder layers (``model.layers.{num_hidden_layers + i}``) for
    speculative decoding in serving engines; transformers builds no module for them and leaves them out on load, as it
    should (its Glm4MoeForCausalLM lists GLM-4.5's own, layers 46 and 92, in _keys_to_ignore_on_load_unexpected)."""
    import json

    from qbench.models.roles import decoder_layers, layer_index

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    layers, nextn = decoder_layers(config), config.get("num_nextn_predict_layers") or 0
    if not layers or not nextn:
        return set()
    return {k for k in keys if (i := layer_index(k)) is not None and layers <= i < layers + nextn}


def check_loading_info(path: Path, info: dict) -> None:
    """Raise :class:`CheckpointMismatch` naming the keys when ``from_pretrained``'s loading info reports missing,
    unexpected or shape-mismatched tensors (transformers only logs them: the model would run on random weights)."""
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ()) - mtp_keys(path, info.get("unexpected_keys") or ())
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or ()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (left uninitialised): {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (ignored): {_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} with mismatched shapes: {_names(mismatched)}")
    if problems:
        raise CheckpointMismatch(
            f"{path}: checkpoint tensors do not match the model ({'; '.join(problems)}); the checkpoint is "
            "incomplete or its quantization_config does not describe it (a pre-quantized checkpoint needs its "
            "library installed and the method that reads its format)"
        )


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if is_chatglm(path) and not (path / "tokenizer.json").is_file():
        raise UsageError(
            f"--model {path}: ChatGLM's sentencepiece tokenizer (tokenizer.model) loads only with remote code and "
            "qbench runs none; put a tokenizer.json (a fast tokenizer with the same vocabulary) in that directory"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
