"""What a served-model case is asked to do (``qbench run --endpoint URL``): the server, the quality bounds the model is
held to, the load sweep and the engine's label. :class:`RunConfig` carries one as its ``endpoint``; the engine then
runs the served case (:mod:`qbench.run.endpoint`) in place of the in-process ones."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from qbench.errors import UsageError
from qbench.methods.bounds import EIGHT_BIT, FOUR_BIT, UNQUANTIZED

# A served model's method name: its case is ``<model>-endpoint``.
METHOD = "endpoint"
# --expect: what the served model is quantized to, and the quality bounds it is then held to.
EXPECT = {"unquantized": UNQUANTIZED, "8bit": EIGHT_BIT, "4bit": FOUR_BIT}


@dataclass
class EndpointConfig:
    url: str
    served_model: str | None = None
    expect: str = "unquantized"
    # Concurrency levels as serving benchmarks sweep them (vLLM's serving benchmark, genai-perf): one user, a few, many.
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 16  # timed streamed requests per level: at 16 every request is in flight at once
    request_timeout_s: float = 120.0
    retries: int = 2
    served_device: str | None = None  # label of the device the server runs on (keys the perf baseline)
    logprobs: int | None = None  # log-probs per position to ask for (default: the stored reference's k)
    speed_only: bool = False  # time the server only (an engine without prompt log-probs: transformers serve)
    # Engine drift: also score the same checkpoint in-process with this method (fp32, bf16, ...) and judge the
    # served log-probs against it, a verdict line of its own (an engine's kernels can drift on their own).
    engine_drift: str | None = None
    # NAME or NAME/VERSION: the engine's label where the server does not say (transformers serve lists no models and
    # has no /version); keys the perf baseline.
    engine: str | None = None

    def validate(self) -> None:
        if self.expect not in EXPECT:
            raise UsageError(f"--expect {self.expect}: choose from {', '.join(EXPECT)}")
        if self.engine_drift is not None:
            from qbench import methods

            methods.get(self.engine_drift)  # an unknown name is a UsageError naming the known ones
        if self.engine_drift and self.speed_only:
            raise UsageError("--engine-drift needs the server's log-probs: drop --speed-only")
        if self.engine is not None and not re.fullmatch(r"[^/\s]+(/[^/\s]+)?", self.engine):
            raise UsageError(f"--engine {self.engine!r}: give NAME or NAME/VERSION, e.g. transformers/5.19.0")
        if any(c > self.requests for c in self.concurrency):
            raise UsageError(
                f"--concurrency {max(self.concurrency)} is more than --requests {self.requests}: that level would "
                "never have that many requests in flight; raise --requests or lower --concurrency"
            )

    def to_json(self) -> dict:
        """Every setting as a JSON value (the concurrency levels as a list); :meth:`from_json` gives it back."""
        return {**asdict(self), "concurrency": list(self.concurrency)}

    @classmethod
    def from_json(cls, doc: dict) -> EndpointConfig:
        return cls(**{**doc, "concurrency": tuple(doc.get("concurrency", cls.concurrency))})
