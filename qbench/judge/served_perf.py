"""The perf baseline and gate of a served model: output tok/s and TTFT per concurrency level against the baseline of
the same engine + version + device, ``perf-<engine>-<version>-<device>.json`` in the case's baseline folder
(``baselines/<model>/endpoint/``). It is compared only when the speed settings (context, new tokens, requests per
level) match too. The in-process gate is :mod:`qbench.judge.perf`; the noise bound is its.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qbench import env as qenv
from qbench.errors import UsageError
from qbench.judge.perf import TOK_S_DROP, device_slug
from qbench.judge.store import atomic_write_json
from qbench.serve.handshake import is_local

SCHEMA_PERF = "qbench.endpoint-perf/1"
# Allowed growth of the mean time to first token over the perf baseline's: the 50% tok/s drop of
# qbench.judge.perf.TOK_S_DROP (shared-CPU noise) expressed as time: 1 / (1 − 0.5) − 1 = +100%.
TTFT_GROWTH = 1 / (1 - TOK_S_DROP["decode_tok_s"]) - 1


def default_served_device(base: str) -> str | None:
    """A server on this machine runs on this machine's device (its slug keys the perf baseline); a remote one's is
    unknown (--served-device)."""
    return device_slug(qenv.default_device()) if is_local(base) else None


def perf_path(case_dir: Path, engine: dict, device: str) -> Path:
    """The perf baseline of ``engine`` ({name, version}) on ``device`` in the case's baseline folder ``case_dir``."""
    key = re.sub(r"[^a-z0-9.]+", "-", f"{engine['name']}-{engine['version']}-{device}".lower()).strip("-")
    return case_dir / f"perf-{key}.json"


def perf_gate(case_dir: Path, engine: dict, device: str | None, perf: dict, label: str, update: bool) -> dict:
    """Compare the serving speed ``perf`` (the served case's) with the perf baseline of this engine + version +
    device in ``case_dir`` (or write it, with ``update``). The baseline's entries for the case: ``perf_path``, a
    ``perf_note`` where nothing was compared, and ``reasons``, the regressions, where it was."""
    if not perf:
        return {}
    if device is None:
        return {"perf_note": "speed not gated: the server is remote; pass --served-device LABEL to key a baseline"}
    path = perf_path(case_dir, engine, device)
    levels = perf["serving"]
    settings = {
        "context": perf["context"],
        "new_tokens": perf["new_tokens"],
        "requests": next(iter(levels.values()))["requests"],
    }
    record = {
        "schema": SCHEMA_PERF,
        "engine": engine,
        "device": device,
        "settings": settings,
        "levels": {c: {"output_tok_s": v["output_tok_s"], "ttft_ms": v["ttft_ms"]["mean"]} for c, v in levels.items()},
    }
    if update:
        atomic_write_json(path, record)
        return {"perf_path": str(path), "perf_updated": True}
    if not path.is_file():
        return {
            "perf_path": str(path),
            "perf_note": f"no perf baseline for {engine['name']} {engine['version']} on {device}: speed not gated "
            "(record one with `qbench baseline update --endpoint URL`)",
        }
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{path}: corrupt perf baseline ({e}); rewrite it with `qbench baseline update --endpoint`"
        ) from None
    if stored.get("settings") != settings:
        return {"perf_path": str(path), "perf_note": f"perf baseline is for {stored.get('settings')}: not compared"}
    reasons = []
    drop = TOK_S_DROP["decode_tok_s"]
    for c, now in record["levels"].items():
        then = stored["levels"].get(c)
        if then is None:
            continue
        if now["output_tok_s"] < then["output_tok_s"] * (1 - drop):
            reasons.append(
                f"output tok/s at concurrency {c} {now['output_tok_s']:.4g} vs baseline {then['output_tok_s']:.4g} "
                f"for {label}: {1 - now['output_tok_s'] / then['output_tok_s']:.0%} slower > {drop:.0%} allowed"
            )
        if now["ttft_ms"] and then["ttft_ms"] and now["ttft_ms"] > then["ttft_ms"] * (1 + TTFT_GROWTH):
            reasons.append(
                f"TTFT at concurrency {c} {now['ttft_ms']:.4g} ms vs baseline {then['ttft_ms']:.4g} ms for {label}: "
                f"+{now['ttft_ms'] / then['ttft_ms'] - 1:.0%} > {TTFT_GROWTH:.0%} allowed"
            )
    return {"perf_path": str(path), "perf_compared": True, "reasons": reasons}
