"""What every case of one model shares (:class:`ModelContext`): the tokenized workload, fingerprints, reference;
and the progress callback type the engine reports through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from qbench.errors import UsageError
from qbench.judge.fingerprint import model_fingerprint, tokenizer_fingerprint
from qbench.models import zoo
from qbench.models.loading import load_tokenizer
from qbench.quality.drift import Reference
from qbench.run.workload import Workload


class ModelSettings(Protocol):
    """The settings :func:`prepare_model` reads, which a :class:`qbench.run.config.RunConfig` has. Declared here
    instead of importing RunConfig: config.py imports this module (ModelContext, check_reference_model), so an import
    back would make a circle."""

    reference: str
    reference_model: str | None
    workload: Workload


Progress = Callable[[str, str], None]


def no_progress(_case: str, _stage: str) -> None:
    pass


@dataclass
class ModelContext:
    """What every case of one model shares: tokenized workload, fingerprints, the reference."""

    spec: str
    name: str
    path: Path
    tokenizer: object
    eval_ids: torch.Tensor
    speed_ids: torch.Tensor
    prompts: dict
    fingerprints: dict
    reference_path: Path | None = None  # where the reference is scored (default: path)
    reference: Reference | None = None
    reference_greedy: list[list[int]] | None = None


def prepare_model(spec: str, cfg: ModelSettings) -> ModelContext:
    path = zoo.resolve(spec)
    ref_path = zoo.resolve(cfg.reference_model) if cfg.reference_model else path
    tokenizer = load_tokenizer(path)
    wl = cfg.workload
    ids = torch.tensor(tokenizer(wl.text(), add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise UsageError(f"{wl.eval_text}: fewer than 2 tokens; pass a longer evaluation text")
    eval_ids = ids[: wl.max_positions + 1]
    longest = max(wl.contexts)
    speed = ids.repeat((longest + ids.numel() - 1) // ids.numel())[:longest]
    return ModelContext(
        spec=spec,
        name=zoo.model_id(spec),
        path=path,
        reference_path=ref_path,
        tokenizer=tokenizer,
        eval_ids=eval_ids,
        speed_ids=speed[None],
        prompts=wl.prompt_set(),
        fingerprints={
            "model": model_fingerprint(path),
            "tokenizer": tokenizer_fingerprint(path),
            "workload": wl.fingerprint(),
            # The reference method, and when it is scored on another checkpoint, that checkpoint's fingerprint.
            "reference": cfg.reference if ref_path == path else f"{cfg.reference}@{model_fingerprint(ref_path)}",
        },
    )


def check_reference_model(spec: str, path: Path, ref_spec: str, ref_path: Path) -> None:
    from qbench.measure.weights import load_config

    if tokenizer_fingerprint(path) != tokenizer_fingerprint(ref_path):
        raise UsageError(
            f"--reference-model {ref_spec}: its tokenizer differs from {spec}'s, so their logits do not compare; "
            "pass the full-precision checkpoint this model was made from"
        )
    ours, theirs = load_config(path).vocab_size, load_config(ref_path).vocab_size
    if ours != theirs:
        raise UsageError(
            f"--reference-model {ref_spec}: vocabulary of {theirs} tokens, {spec} has {ours}; pass the "
            "full-precision checkpoint this model was made from"
        )
