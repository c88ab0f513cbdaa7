"""The Markdown report's drift detail: each case's KLD by the reference's confidence (with its multiple of the
floor) and its flips (qbench.quality.breakdown, qbench.quality.flips)."""

from __future__ import annotations


def _x(v) -> str:
    return "–" if v is None else f"{v:.1f}×"


def _cell(row: dict) -> str:
    if not row.get("positions"):
        return "– (0)"
    floor = f", {_x(row.get('kld_over_floor'))}" if row.get("kld_over_floor") is not None else ""
    return f"{row['kld_mean']:.2e}{floor}, top1 {row['same_top1']:.3f} ({row['positions']})"


def confidence_table(results: dict) -> list[str]:
    cases = [c for c in results["cases"] if (c.get("quality") or {}).get("by_confidence")]
    if not cases:
        return []
    names = [r["bucket"] for r in cases[0]["quality"]["by_confidence"]]
    floor = next((c["quality"]["floor"] for c in cases if c["quality"].get("floor")), None)
    said = (
        f"floor: KLD {floor['kld_mean']:.2e}, same top1 {floor['same_top1']:.3f} ({floor['procedure']})"
        if floor
        else "no noise floor measured (run without --no-noise-floor, or re-record a stored reference)"
    )
    lines = [
        "",
        "#### Drift by the reference's top-1 probability (p1)",
        "",
        f"Each cell: KLD mean, its multiple of the floor's in the same bucket, same top-1 (positions). {said}.",
        "",
        "| case | KLD / floor | " + " | ".join(names) + " |",
        "|---|--:|" + "--:|" * len(names),
    ]
    for c in cases:
        q = c["quality"]
        cells = " | ".join(_cell(r) for r in q["by_confidence"])
        lines.append(f"| `{c['id']}` | {_x(q.get('kld_over_floor'))} | {cells} |")
    return lines


def _flip(f: dict | None) -> str:
    if not f:
        return "–"
    lo, hi = f["lost_ci95"]
    return f"−{f['lost']} / +{f['gained']} of {f['n']} (lost {lo:.1%}–{hi:.1%}; McNemar p {f['mcnemar_p']:.2g})"


def flips_table(results: dict) -> list[str]:
    cases = [c for c in results["cases"] if (c.get("quality") or {}).get("flips")]
    if not cases:
        return []
    lines = [
        "",
        "#### Flips against the reference: answers lost (right → wrong) / gained (wrong → right)",
        "",
        "95% Wilson intervals; McNemar's exact p for lost vs gained. Tokens whose answer ties for top-1 are left out.",
        "",
        "| case | tokens | additions | not gated |",
        "|---|---|---|---|",
    ]
    for c in cases:
        f = c["quality"]["flips"]
        notes = "; ".join(f"{k}: {v}" for k, v in ((c.get("baseline") or {}).get("flips_notes") or {}).items())
        lines.append(f"| `{c['id']}` | {_flip(f.get('tokens'))} | {_flip(f.get('additions'))} | {notes or '–'} |")
    return lines
