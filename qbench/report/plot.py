"""``qbench report RESULTS.json --plot out.png``: quality against weight memory, and speed against context."""

from __future__ import annotations

from pathlib import Path

from qbench.errors import UsageError


def plot(results: dict, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib; install it with pip install 'qbench[plot]'") from None
    cases = [c for c in results["cases"] if c.get("quality") and c.get("footprint")]
    if not cases:
        raise UsageError("the results hold no measured case to plot (every case errored or was skipped)")
    sweeps = [c for c in cases if "sweep" in c.get("perf", {})]
    fig, axes = plt.subplots(1, 2 if sweeps else 1, figsize=(12 if sweeps else 6.5, 4.8), squeeze=False)
    ax = axes[0][0]
    for c in cases:
        mb = c["footprint"]["weights_bytes"] / 2**20
        kld = max(c["quality"]["kld_mean"], 1e-7)  # the reference itself has KLD 0: keep it on a log axis
        tok = c.get("perf", {}).get("decode_tok_s", {}).get("mean")
        ax.scatter(mb, kld, s=40)
        label = f"{c['model']} {c['method']}" + (f"\n{tok:.0f} tok/s" if tok else "")
        ax.annotate(label, (mb, kld), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("weight memory (MiB)")
    ax.set_ylabel("KLD mean vs reference (nats, log)")
    ax.set_yscale("log")
    ax.set_title("quality vs weight memory (label: decode tok/s)")
    ax.grid(alpha=0.3)
    if sweeps:
        ax = axes[0][1]
        for c in sweeps:
            for batch in sorted({s["batch"] for s in c["perf"]["sweep"]}):
                pts = sorted(
                    (s["context"], s["decode_tok_s"]["mean"]) for s in c["perf"]["sweep"] if s["batch"] == batch
                )
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{c['method']} b{batch}")
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
