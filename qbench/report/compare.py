"""``qbench compare A.json B.json``: did anything change between two runs? (before and after an upgrade of
transformers or bitsandbytes, a driver, a new checkpoint export).

Cases are matched by id. Each pair is judged with the same gates a run applies against its stored baseline, A
standing in for the baseline: the fingerprints must match (model, tokenizer, workload, reference) or the pair is
refused; quality metrics may move only within the measured noise of :mod:`qbench.judge.tolerances`; weight
bytes must be equal; a greedy continuation may change only at a near-tie; speed is gated with the perf bounds
when both runs timed the same settings on the same device. The library versions that differ are listed, so a
regression points at the upgrade that made it.
"""

from __future__ import annotations

from pathlib import Path

from qbench.judge import perf as perf_baseline
from qbench.judge.verdict import ERROR, fingerprint_mismatches, regression_gate

SAME, CHANGED, REFUSED, NOT_COMPARED = "same", "regressed", "refused", "not compared"
SHOWN = ("ppl", "kld_mean", "kld_p99", "same_top1", "addition_accuracy")


def _device_key(doc: dict) -> tuple:
    dev = doc.get("env", {}).get("device", {})
    return dev.get("type"), dev.get("name"), dev.get("capability")


def compare_case(a: dict, b: dict, same_device: bool) -> dict:
    label = f"{b['method']} on {b['model']}"
    out = {"id": b["id"], "a_status": a["status"], "b_status": b["status"], "reasons": [], "notes": []}
    out["metrics"] = {k: [a.get("quality", {}).get(k), b.get("quality", {}).get(k)] for k in SHOWN}
    if ERROR in (a["status"], b["status"]):
        which = " and ".join(n for n, c in (("A", a), ("B", b)) if c["status"] == ERROR)
        out["verdict"] = CHANGED if b["status"] == ERROR and a["status"] != ERROR else NOT_COMPARED
        out["reasons" if out["verdict"] == CHANGED else "notes"].append(
            f"{which} errored: {(b if b['status'] == ERROR else a)['reasons'][0]}"
        )
        return out
    unmeasured = [(n, c) for n, c in (("A", a), ("B", b)) if "quality" not in c]
    if unmeasured:  # refused before it ran (a baseline that does not compare, with --lenient): nothing to compare
        out["verdict"] = NOT_COMPARED
        name, c = unmeasured[0]
        out["notes"].append(f"{name} was not measured ({c['status']}: {(c.get('reasons') or ['no reason'])[0]})")
        return out
    refused = fingerprint_mismatches(b.get("fingerprints", {}), a.get("fingerprints", {}))
    if refused:
        out["verdict"], out["reasons"] = REFUSED, refused
        return out
    m = {
        "quality": b["quality"],
        "footprint": b["footprint"],
        "greedy": b["greedy_ids"],
        "greedy_margins": b.get("greedy_margins") or [[float("inf")] * len(g) for g in b["greedy_ids"]],
    }
    base = {
        "quality": a["quality"],
        "footprint": a["footprint"],
        "greedy": a["greedy_ids"],
        "greedy_margins": a.get("greedy_margins"),
    }
    # Same device (type, name, capability: on a CPU its kernel set) means same kernels: the tighter bounds apply.
    out["reasons"] = regression_gate(m, base, label, same_kernels=same_device)
    pa, pb = a.get("perf"), b.get("perf")
    out["metrics"]["decode_tok_s"] = [pa and pa["decode_tok_s"]["mean"], pb and pb["decode_tok_s"]["mean"]]
    if not (pa and pb):
        out["notes"].append("speed not compared: a run has no speed figures")
    elif not same_device:
        out["notes"].append("speed not compared: the runs were on different devices")
    elif min(pa["decode_tok_s"]["n"], pb["decode_tok_s"]["n"]) < perf_baseline.MIN_REPEAT:
        out["notes"].append(f"speed not compared: {perf_baseline.MIN_REPEAT}+ timed runs are needed in both")
    else:
        stored = perf_baseline.record(pa, a.get("memory", {}), a["device"])  # run A stands in for the baseline
        reasons, note = perf_baseline.gate(pb, b.get("memory", {}), b["device"], stored, label)
        out["reasons"] += reasons
        if note:
            out["notes"].append(note)
    out["verdict"] = CHANGED if out["reasons"] else SAME
    return out


def compare(a: dict, b: dict) -> dict:
    """The comparison document: per case its verdict, reasons and the shown metrics as [A, B]."""
    cases_a = {c["id"]: c for c in a["cases"]}
    cases_b = {c["id"]: c for c in b["cases"]}
    same_device = _device_key(a) == _device_key(b)
    libs_a, libs_b = a.get("env", {}).get("libraries", {}), b.get("env", {}).get("libraries", {})
    return {
        "schema": "qbench.compare/1",
        "libraries_changed": {
            k: [libs_a.get(k), libs_b.get(k)]
            for k in sorted(set(libs_a) | set(libs_b))
            if libs_a.get(k) != libs_b.get(k)
        },
        "same_device": same_device,
        "cases": [compare_case(cases_a[i], cases_b[i], same_device) for i in cases_a if i in cases_b],
        "only_in_a": [i for i in cases_a if i not in cases_b],
        "only_in_b": [i for i in cases_b if i not in cases_a],
    }


def failed(doc: dict) -> bool:
    return any(c["verdict"] in (CHANGED, REFUSED) for c in doc["cases"])


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def print_comparison(doc: dict, console, a_name: str, b_name: str) -> None:
    from rich.table import Table

    if doc["libraries_changed"]:
        changed = ", ".join(f"{k} {_fmt(v[0])} → {_fmt(v[1])}" for k, v in doc["libraries_changed"].items())
        console.print(f"libraries: {changed}", markup=False, highlight=False)
    table = Table(title=f"qbench compare · A {a_name} → B {b_name}")
    table.add_column("case")
    for k in (*SHOWN, "decode_tok_s"):
        table.add_column(k.replace("_", " "), justify="right")
    table.add_column("verdict")
    for c in doc["cases"]:
        cells = [
            f"{_fmt(c['metrics'].get(k, [None, None])[0])} → {_fmt(c['metrics'].get(k, [None, None])[1])}"
            for k in (*SHOWN, "decode_tok_s")
        ]
        style = {CHANGED: "red", REFUSED: "yellow"}.get(c["verdict"], "")
        table.add_row(c["id"], *cells, f"[{style}]{c['verdict']}[/]" if style else c["verdict"])
    console.print(table)
    for c in doc["cases"]:
        for r in c["reasons"]:
            console.print(f"  {c['id']}: {r}", markup=False, highlight=False)
        for n in c["notes"]:
            console.print(f"  {c['id']}: {n}", markup=False, highlight=False, style="dim")
    for side, ids in (("A", doc["only_in_a"]), ("B", doc["only_in_b"])):
        if ids:
            console.print(f"only in {side}, not compared: {', '.join(ids)}", markup=False, highlight=False)


def to_markdown(doc: dict, a_name: str, b_name: str) -> str:
    lines = [f"# qbench compare: `{a_name}` → `{b_name}`", ""]
    if doc["libraries_changed"]:
        lines += ["Libraries: " + ", ".join(f"{k} {v[0]} → {v[1]}" for k, v in doc["libraries_changed"].items()), ""]
    head = ["case", *SHOWN, "decode_tok_s", "verdict"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in doc["cases"]:
        cells = [
            f"{_fmt(c['metrics'].get(k, [None, None])[0])} → {_fmt(c['metrics'].get(k, [None, None])[1])}"
            for k in (*SHOWN, "decode_tok_s")
        ]
        lines.append("| " + " | ".join([c["id"], *cells, c["verdict"]]) + " |")
    reasons = [f"- {c['id']}: {r}" for c in doc["cases"] for r in c["reasons"]]
    return "\n".join(lines + ([""] + reasons if reasons else [])) + "\n"


def run(a_path: Path, b_path: Path, console, markdown: Path | None = None, json_out: Path | None = None) -> bool:
    """Compare two results files, print (and write) the comparison; True when B regressed or was refused."""
    from qbench.judge.store import atomic_write_json
    from qbench.report.results import load_results

    doc = compare(load_results(a_path), load_results(b_path))
    print_comparison(doc, console, str(a_path), str(b_path))
    if markdown:
        markdown.write_text(to_markdown(doc, str(a_path), str(b_path)), encoding="utf-8")
    if json_out:
        atomic_write_json(json_out, doc)
    return failed(doc)
