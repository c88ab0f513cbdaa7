"""The GPU check's files: gpu-check.json (rewritten atomically after every step), gpu-check.md, the archives.

Standard library only. What comes back from the device machine is at most 8 files (``MAX_OUT_FILES``), so the check
writes five into its output folder: ``gpu-check.json``, ``gpu-check.md``, ``baselines-cuda.tar.gz`` (the baselines it
recorded, laid out as under ``baselines/``: unpack at the repository root), ``results-cuda.tar.gz`` (qbench's
results JSON and tables, the GPU tests' junit XML) and ``logs.tar.gz`` (each step's output).
"""

from __future__ import annotations

import json
import os
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_check_lib import MAX_OUT_FILES, Outcome

SCHEMA = "qbench.gpu-check/1"


def write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` so that a reader (or a kill) never sees half a file: a temporary beside it, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def junit_outcomes(path: Path) -> dict[str, list[str]]:
    """{passed, skipped, failed: [test ids]} from pytest's --junitxml report (an error counts as failed)."""
    out: dict[str, list[str]] = {"passed": [], "skipped": [], "failed": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"].append(test)
        elif case.find("skipped") is not None:
            out["skipped"].append(test)
        else:
            out["passed"].append(test)
    return out


def results_summary(path: Path) -> dict:
    """Verdict counts of a qbench results file and the cases that did not pass, with their first reasons."""
    cases = json.loads(path.read_text(encoding="utf-8")).get("cases", [])
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.get("status", "?")] = counts.get(c.get("status", "?"), 0) + 1
    bad = [
        {"id": c.get("id"), "status": c.get("status"), "reasons": (c.get("reasons") or [])[:3]}
        for c in cases
        if c.get("status") in ("drift", "regression", "error")
    ]
    return {"cases": len(cases), "counts": counts, "not_passed": bad}


def pack(archive: Path, root: Path, files: list[Path] | None = None) -> list[str]:
    """``files`` (default: every file under ``root``) into the gzip tar ``archive``, named relative to ``root``.
    Returns the names packed; nothing is written when there is nothing to pack."""
    files = sorted(p for p in root.rglob("*") if p.is_file()) if files is None else sorted(files)
    names = [str(p.relative_to(root)) for p in files]
    if names:
        tmp = archive.with_name(archive.name + ".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for p, name in zip(files, names, strict=True):
                tar.add(p, arcname=name)
        os.replace(tmp, archive)  # a kill while packing leaves the previous archive whole
    return names


def out_files_problem(out: Path) -> str | None:
    n = sum(1 for p in out.iterdir() if p.is_file())
    return None if n <= MAX_OUT_FILES else f"{out} holds {n} files: only {MAX_OUT_FILES} come back from the machine"


def document(meta: dict, plan: list[dict], outcomes: list[Outcome], finished: bool) -> dict:
    return {"schema": SCHEMA, **meta, "finished": finished, "plan": plan, "steps": [o.to_json() for o in outcomes]}


def _fmt_b(n) -> str:
    return "" if n is None else f"{n / 2**20:,.0f}"


def _fmt_r(x) -> str:
    return "" if x is None else f"{x:.3f}"


def _yes(x) -> str:
    return "" if x is None else ("yes" if x else "**no**")


def _fmt_v(v) -> str:
    """A constant or a measured figure: bytes (ints of a MiB or more) in MiB, other numbers to 3 significant places."""
    if v is None:
        return "not measured"
    if abs(v) >= 2**20:
        return f"{v / 2**20:,.0f} MiB"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def render_md(doc: dict) -> str:
    steps = {s["name"]: s for s in doc["steps"]}
    env = steps.get("env", {}).get("result", {})
    versions = env.get("versions", {})
    lines = [
        "# qbench GPU check",
        "",
        f"GPU: {env.get('gpu', 'none')} ({env.get('device_class', 'no CUDA')}), torch {versions.get('torch')}"
        f" (CUDA {env.get('torch_cuda')}), transformers {versions.get('transformers')}; budget "
        f"{doc.get('budget_s')} s, elapsed {doc.get('elapsed_s')} s, exit status {doc.get('exit_status')}"
        f"{'' if doc.get('finished') else ' (not finished: killed or still running)'}.",
        "",
        "| step | status | seconds | expected | note |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    expected = {p["name"]: p["expected_s"] for p in doc.get("plan", [])}
    for s in doc["steps"]:
        note = s["reason"] or "; ".join(s["problems"][:3])
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {expected.get(s['name'], '')} | {note} |")
    for s in doc["steps"]:
        if s["error_tail"]:
            lines += ["", f"`{s['name']}` failed: {s['reason']}", "", "```text", s["error_tail"], "```"]
    for note in env.get("version_notes", []):
        lines.append(f"- versions: {note}")
    rows = [r for name in ("memory-bf16", "memory-nf4") for r in steps.get(name, {}).get("result", {}).get("rows", [])]
    if rows:
        lines += [
            "",
            "## Memory at real size (GLM-4-9B shape, random weights), MiB",
            "",
            "| method | context | allocator peak | reserved | NVML | estimate | alloc / est-overhead | within 10% | "
            "NVML / est | within 10% | published | NVML / published |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: |",
        ]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['context']} | {_fmt_b(r['allocator_peak_bytes'])} | "
                f"{_fmt_b(r['reserved_peak_bytes'])} | {_fmt_b(r['nvml_peak_bytes'])} | "
                f"{_fmt_b(r['estimate_runtime_bytes'])} | {_fmt_r(r['allocator_vs_estimate'])} | "
                f"{_yes(r['allocator_within_10pct'])} | {_fmt_r(r['nvml_vs_estimate'])} | "
                f"{_yes(r['nvml_within_10pct'])} | {_fmt_b(r['published_bytes'])} | {_fmt_r(r['nvml_vs_published'])} |"
            )
    ratios = steps.get("speed", {}).get("result", {}).get("ratios")
    if ratios:
        lines += ["", "## Speed (GLM-4-9B shape, bf16, batch 1)", ""]
        lines += [f"- {k}: {_fmt_r(v) if isinstance(v, float) else v}" for k, v in ratios.items()]
    tests = steps.get("gpu-tests", {}).get("result", {}).get("outcomes")
    if tests:
        lines += ["", "## GPU tests", "", ", ".join(f"{len(v)} {k}" for k, v in tests.items())]
        lines += [f"- failed: {t}" for t in tests["failed"]]
    run = steps.get("qbench-run", {}).get("result", {})
    for inv in run.get("invocations", []):
        lines += ["", f"## `{inv['label']}`: exit {inv.get('rc')}, {inv.get('summary', {}).get('counts', {})}", ""]
        lines += [f"Not recorded: {inv['note']}", ""] if inv.get("note") else []
        lines += [
            f"- {c['id']}: {c['status']}: {'; '.join(c['reasons'])}"
            for c in inv.get("summary", {}).get("not_passed", [])
        ]
        if inv.get("table"):
            lines += ["", "```text", inv["table"].rstrip(), "```"]
    for model, sel in run.get("left_out", {}).items():
        lines += [f"- {model}: {note}" for note in sel]
    consts = steps.get("constants", {}).get("result", {}).get("rows", [])
    if consts:
        lines += [
            "",
            "## What the CPU code assumed, measured",
            "",
            "| constant | in the code | measured | measured / code | measured as | lives in |",
            "| --- | ---: | ---: | ---: | --- | --- |",
        ]
        for c in consts:
            lines.append(
                f"| {c['constant']} | {_fmt_v(c['code_value'])} | {_fmt_v(c['measured'])} | "
                f"{_fmt_r(c['measured_over_code'])}"
                f" | {c['measured_as']} | {c['lives_in']} |"
            )
    return "\n".join(lines) + "\n"
