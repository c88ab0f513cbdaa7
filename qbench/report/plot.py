"""``qbench report RESULTS.json --plot out.png``: which quantization for my GLM — quality against weight size
against decode speed for every measured case, and decode speed against context when the run swept contexts.

Panels: (1) KLD mean (log) against weight memory, each point coloured by its decode tok/s; (2) PPL ratio against
decode tok/s, each point sized by its weight memory. The best methods sit bottom-left in (1) and bottom-right in
(2). The reference has KLD 0 and is drawn at the axis floor (``KLD_FLOOR``), labelled as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qbench.errors import UsageError

KLD_FLOOR = 1e-7  # where a KLD of 0 (the reference itself) is drawn on the log axis; below every measured quant


@dataclass(frozen=True)
class Point:
    label: str  # "model method" ("method" when every case is of one model)
    weights_mib: float
    kld_mean: float
    ppl_ratio: float | None
    decode_tok_s: float | None  # the generate-path decode figure; None when the case was not timed


def points(results: dict) -> list[Point]:
    """One point per case that has quality and footprint figures (errored and skipped cases have neither)."""
    out = []
    one_model = len({c["model"] for c in results["cases"]}) == 1  # then the labels name the method alone
    for c in results["cases"]:
        q, fp = c.get("quality"), c.get("footprint")
        if not q or not fp:
            continue
        tok = (c.get("perf") or {}).get("decode_tok_s", {}).get("mean")
        label = c["method"] if one_model else f"{c['model']} {c['method']}"
        out.append(Point(label, fp["weights_bytes"] / 2**20, q["kld_mean"], q.get("ppl_ratio"), tok))
    return out


def plot(results: dict, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib; install it with pip install 'qbench[plot]'") from None
    pts = points(results)
    if not pts:
        raise UsageError("the results hold no measured case to plot (every case errored or was skipped)")
    sweeps = [c for c in results["cases"] if c.get("quality") and "sweep" in (c.get("perf") or {})]
    timed = [p for p in pts if p.decode_tok_s is not None]
    ncols = 1 + bool(timed) + bool(sweeps)
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 5.2), squeeze=False)
    axes = list(axes[0])

    ax = axes.pop(0)
    speeds = [p.decode_tok_s for p in timed]
    norm = plt.Normalize(min(speeds), max(speeds)) if speeds else None
    for p in pts:
        kld = max(p.kld_mean, KLD_FLOOR)
        colour = plt.cm.viridis(norm(p.decode_tok_s)) if norm and p.decode_tok_s is not None else "grey"
        ax.scatter(p.weights_mib, kld, s=46, color=colour, edgecolors="black", linewidths=0.4)
        ax.annotate(
            p.label + (" (reference)" if p.kld_mean == 0 else ""),
            (p.weights_mib, kld),
            textcoords="offset points",
            xytext=(5, 3),
            fontsize=7,
        )
    if norm:
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="decode tok/s")
    ax.set_xlabel("weight memory (MiB)")
    ax.set_ylabel("KLD mean vs reference (nats, log)")
    ax.set_yscale("log")
    ax.set_title("quality vs weight size (colour: decode speed)")
    ax.grid(alpha=0.3)

    if timed:
        ax = axes.pop(0)
        biggest = max(p.weights_mib for p in timed) or 1.0
        for p in timed:
            ratio = p.ppl_ratio if p.ppl_ratio is not None else float("nan")
            ax.scatter(p.decode_tok_s, ratio, s=20 + 200 * p.weights_mib / biggest, alpha=0.7, edgecolors="black")
            ax.annotate(p.label, (p.decode_tok_s, ratio), textcoords="offset points", xytext=(5, 3), fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("decode tok/s (through generate)")
        ax.set_ylabel("PPL ratio vs reference")
        ax.set_title("quality vs decode speed (size: weight memory)")
        ax.grid(alpha=0.3)

    if sweeps:
        ax = axes.pop(0)
        for c in sweeps:
            for batch in sorted({s["batch"] for s in c["perf"]["sweep"]}):
                pts_ = sorted(
                    (s["context"], s["decode_tok_s"]["mean"]) for s in c["perf"]["sweep"] if s["batch"] == batch
                )
                ax.plot(*zip(*pts_, strict=True), marker="o", label=f"{c['method']} b{batch}")
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel("decode tok/s")
        ax.set_xscale("log", base=2)
        ax.set_title("decode speed vs context")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"qbench · {results['env']['device'].get('name')} · {results['config']['device']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
