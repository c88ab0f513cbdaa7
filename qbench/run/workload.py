"""What a case runs: the evaluation text for quality, fixed prompts and lengths for speed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from qbench.errors import UsageError
from qbench.models.zoo import EVAL_TEXT, PROMPTS


@dataclass(frozen=True)
class Workload:
    eval_text: Path = field(default=EVAL_TEXT, metadata={"help": "UTF-8 text scored for perplexity and KLD"})
    prompts: Path = field(default=PROMPTS, metadata={"help": "JSON prompt set for greedy agreement"})
    # 128: glm-tiny's training length (RoPE positions beyond it were never trained). llama.cpp's perplexity
    # tool uses 512 by default; pass --window 512 or more for real GLMs.
    window: int = field(default=128, metadata={"help": "tokens per scoring window"})
    max_positions: int = field(default=4096, metadata={"help": "at most this many scored positions"})
    # 32: on glm-tiny the top-32 KLD is within 4.3% of the full-vocabulary KLD (k=64: 1.9%, k=16: 8%), and
    # the stored reference stays under 1 MB (qbench/judge/reference.py).
    top_k: int = field(default=32, metadata={"help": "reference top-k kept per position"})
    greedy_tokens: int = field(default=24, metadata={"help": "greedy continuation length per prompt"})
    contexts: tuple[int, ...] = field(default=(128,), metadata={"help": "prompt tokens for the speed test (sweep)"})
    batches: tuple[int, ...] = field(default=(1,), metadata={"help": "batch sizes for the speed test (sweep)"})
    new_tokens: int = field(default=32, metadata={"help": "tokens generated per speed run (exactly)"})
    repeat: int = field(default=5, metadata={"help": "timed speed runs"})
    warmup: int = field(default=1, metadata={"help": "untimed speed runs before them"})
    # One more scoring pass of the reference (qbench.quality.floor); it adds figures and gates nothing, so it is not in
    # the fingerprint: a reference made without it is still comparable, it only lacks the floor.
    noise_floor: bool = field(default=True, metadata={"help": "measure the reference's bf16 noise floor"})

    # Settings of the speed test only: they do not change any quality number, so not the fingerprint either.
    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("contexts", "batches", "new_tokens", "repeat", "warmup")
    # Settings that add figures without changing any other: not in the fingerprint either.
    FIGURES_ONLY: ClassVar[tuple[str, ...]] = ("noise_floor",)
    # The fields JSON cannot hold as they are: paths (held as strings) and sweeps (held as lists).
    PATHS: ClassVar[tuple[str, ...]] = ("eval_text", "prompts")
    SWEEPS: ClassVar[tuple[str, ...]] = ("contexts", "batches")

    def __post_init__(self) -> None:
        for name in ("window", "max_positions", "top_k", "greedy_tokens", "new_tokens", "repeat"):
            if getattr(self, name) < 1:
                flag = name.replace("_", "-")
                raise UsageError(f"--{flag} {getattr(self, name)}: must be a positive integer")
        for name, flag in (("contexts", "--context"), ("batches", "--batch")):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise UsageError(f"{flag} {','.join(map(str, values))}: every value must be a positive integer")
        if self.warmup < 0:
            raise UsageError(f"--warmup {self.warmup}: must be 0 or more")

    def to_json(self) -> dict:
        """Every setting as a JSON value (paths as strings, sweeps as lists); :meth:`from_json` gives this workload
        back."""
        doc = asdict(self)
        doc.update({k: str(doc[k]) for k in self.PATHS})
        doc.update({k: list(doc[k]) for k in self.SWEEPS})
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> Workload:
        """The workload :meth:`to_json` wrote ``doc`` from; a setting ``doc`` lacks takes its default."""
        values = dict(doc)
        values.update({k: Path(values[k]) for k in cls.PATHS if k in values})
        values.update({k: tuple(values[k]) for k in cls.SWEEPS if k in values})
        return cls(**values)

    def text(self) -> str:
        return read_text(self.eval_text)

    def prompt_set(self) -> dict:
        try:
            data = json.loads(read_text(self.prompts))
        except json.JSONDecodeError as e:
            raise UsageError(f"prompt set {self.prompts}: not valid JSON ({e}); fix the file") from None
        if not isinstance(data, dict) or not isinstance(data.get("text"), list) or not data["text"]:
            raise UsageError(f"prompt set {self.prompts}: needs a non-empty list under 'text'")
        return data

    def fingerprint(self) -> str:
        """Hash of everything that changes the numbers: the texts and the settings that shape the scoring."""
        h = hashlib.sha256()
        h.update(self.eval_text.read_bytes())
        h.update(self.prompts.read_bytes())
        settings = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("eval_text", "prompts", *self.SPEED_ONLY, *self.FIGURES_ONLY)
        }
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


def read_text(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; pass an existing UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise UsageError(f"{path}: the file is empty; pass a text with at least a few hundred tokens")
    return text
