"""A results document as a terminal table and as Markdown (for $GITHUB_STEP_SUMMARY)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from qbench.report import drift_detail

STATUS_STYLE = {"pass": "green", "drift": "red", "regression": "red", "error": "bold red", "skipped": "yellow"}


def _mb(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _tok_s(perf: dict, key: str) -> str:
    s = perf.get(key)
    if not s or not s.get("n"):
        return "–"
    return f"{s['mean']:.0f} ± {s['std']:.0f}"


def table(results: dict) -> Table:
    t = Table(title=f"qbench · {results['config']['device']} · reference {results['config']['reference']}")
    cols = [
        "model",
        "method",
        "weights MB",
        "ppl",
        "ppl ratio",
        "KLD mean",
        "same top1",
        "prefill tok/s",
        "decode tok/s",
        "peak MB",
        "status",
    ]
    moe = _has_routing(results)
    if moe:  # a mixture-of-experts model's routing drift (qbench.quality.routing)
        cols.insert(cols.index("same top1") + 1, "routing changed")
    floor = _has_floor(results)
    if floor:  # the KLD as a multiple of the reference's bf16 noise floor (qbench.quality.floor)
        cols.insert(cols.index("KLD mean") + 1, "× floor")
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "method", "status") else "right")
    for c in results["cases"]:
        q, perf, mem = c.get("quality", {}), c.get("perf", {}), c.get("memory", {})
        peak = max(mem.get("peak_load_bytes") or 0, mem.get("peak_run_bytes") or 0) or None
        status = c["status"]
        routing = [_num(q.get("routing_changed"), ".4f")] if moe else []
        over = [_num(q.get("kld_over_floor"), ".1f")] if floor else []
        t.add_row(
            c["model"],
            c["method"] if c.get("compute_dtype") is None else f"{c['method']} ({c['compute_dtype']})",
            _mb(c.get("footprint", {}).get("weights_bytes")),
            _num(q.get("ppl"), ".3f"),
            _num(q.get("ppl_ratio"), ".4f"),
            _num(q.get("kld_mean"), ".5f"),
            *over,
            _num(q.get("same_top1"), ".3f"),
            *routing,
            _tok_s(perf, "prefill_tok_s"),
            _tok_s(perf, "decode_tok_s"),
            _mb(peak),
            f"[{STATUS_STYLE.get(status, '')}]{status}[/]",
        )
    return t


def print_report(results: dict, console: Console) -> None:
    console.print(table(results))
    for c in results["cases"]:
        for r in c.get("reasons", []):
            console.print(f"  {c['id']}: {r}", markup=False, highlight=False)
    for line in perf_notes(results) + serving_lines(results):
        console.print(f"  {line}", markup=False, highlight=False)
    tails = [c["id"] for c in results["cases"] if c["status"] == "error" and c.get("log_tail")]
    if tails:  # the reason above says what happened; the raw log (a traceback, a crash's output) stays in the file
        console.print(
            f"  the last lines of each error case's log are in the results file (cases[].log_tail; write it with "
            f"--json): {', '.join(tails)}",
            markup=False,
            highlight=False,
        )


def serving_lines(results: dict) -> list[str]:
    """A served model's speed per concurrency level, and its baseline's note (e.g. drift not measured)."""
    out = []
    for c in results["cases"]:
        for level in (c.get("perf") or {}).get("serving", {}).values():
            out.append(
                f"{c['id']} concurrency {level['concurrency']}: TTFT p50 {_ms(level['ttft_ms'].get('p50'))}, "
                f"TPOT p50 {_ms(level['tpot_ms'].get('p50'))}, ITL p99 {_ms(level['itl_ms'].get('p99'))}, "
                f"{level['output_tok_s']:.1f} output tok/s"
            )
        if c.get("endpoint") and (note := (c.get("baseline") or {}).get("note")):  # e.g. drift not measured
            out.append(f"{c['id']}: {note}")
    return out


def _ms(v) -> str:
    return "–" if v is None else f"{v:.1f} ms"


def perf_notes(results: dict) -> list[str]:
    """Why speed was not gated, once per distinct reason, with the cases it applies to."""
    by_note: dict[str, list[str]] = {}
    for c in results["cases"]:
        note = (c.get("baseline") or {}).get("perf_note")
        if note and c["status"] != "error":
            by_note.setdefault(note, []).append(c["id"])
    out = []
    for note, ids in by_note.items():
        which = "every case" if len(ids) == len(results["cases"]) > 1 else ", ".join(ids)
        out.append(f"speed: {note} ({which})")
    return out


def _has_floor(results: dict) -> bool:
    return any("kld_over_floor" in (c.get("quality") or {}) for c in results["cases"])


def _has_routing(results: dict) -> bool:
    return any("routing_changed" in (c.get("quality") or {}) for c in results["cases"])


def markdown(results: dict) -> str:
    """A Markdown table fit for $GITHUB_STEP_SUMMARY."""
    env = results["env"]
    dev = env["device"]
    lines = [
        f"### qbench · {dev.get('name')} ({results['config']['device']}) · reference {results['config']['reference']}",
        "",
        "libraries: " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v),
        "",
        "| model | method | weights MB | ppl | ppl ratio | KLD mean | "
        + ("× floor | " if (floor := _has_floor(results)) else "")
        + "KLD p99 | same top1 | "
        + ("routing changed | " if (moe := _has_routing(results)) else "")
        + "prefill tok/s | decode tok/s | peak MB | status |",
        "|---|---|--:|--:|--:|--:|"
        + ("--:|" if floor else "")
        + "--:|--:|"
        + ("--:|" if moe else "")
        + "--:|--:|--:|---|",
    ]
    for c in results["cases"]:
        q, perf, mem = c.get("quality", {}), c.get("perf", {}), c.get("memory", {})
        peak = max(mem.get("peak_load_bytes") or 0, mem.get("peak_run_bytes") or 0) or None
        routing = f" {_num(q.get('routing_changed'), '.4f')} |" if moe else ""
        over = f" {_num(q.get('kld_over_floor'), '.1f')} |" if floor else ""
        lines.append(
            f"| {c['model']} | {c['method']} | {_mb(c.get('footprint', {}).get('weights_bytes'))} "
            f"| {_num(q.get('ppl'), '.3f')} | {_num(q.get('ppl_ratio'), '.4f')} "
            f"| {_num(q.get('kld_mean'), '.5f')} |{over}"
            f" {_num(q.get('kld_p99'), '.4f')} | {_num(q.get('same_top1'), '.3f')} |{routing}"
            f" {_tok_s(perf, 'prefill_tok_s')} | {_tok_s(perf, 'decode_tok_s')} | {_mb(peak)} | {c['status']} |"
        )
    reasons = [f"- `{c['id']}`: {r}" for c in results["cases"] for r in c.get("reasons", [])]
    reasons += [f"- {line}" for line in perf_notes(results)]
    detail = drift_detail.confidence_table(results) + drift_detail.flips_table(results)
    return "\n".join(lines + ([""] + reasons if reasons else []) + detail) + "\n"
