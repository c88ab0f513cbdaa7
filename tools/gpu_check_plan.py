"""``tools/gpu_check --plan`` and ``--make-wheels``: what the check will do, how long it should take, what travels.

Standard library only. ``--make-wheels DIR`` needs PyPI (run it where there is a network, before lending a GPU):
it downloads the wheels of :data:`gpu_check_lib.WHEELS` for Python 3.12 on manylinux x86_64, builds hqq's (PyPI has
only its sdist) and slims bitsandbytes' to its CUDA 13 and CPU libraries, so that wheels and tree fit in 64 MiB.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gpu_check_lib as lib


def tree_bytes(repo: Path) -> int | None:
    """Bytes of what the device machine copies: tracked files and untracked ones git does not ignore (None where
    git cannot say: not a checkout, no git)."""
    try:
        names = (
            subprocess.run(
                ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=repo,
                capture_output=True,
                check=True,
                timeout=30,
            )
            .stdout.decode()
            .split("\0")
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return sum((repo / n).stat().st_size for n in names if n and (repo / n).is_file())


def _mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:.1f} MB"


def plan_text(tree: int | None, wheel_dir: Path | None = None, budget_s: float = lib.DEFAULT_BUDGET_S) -> str:
    lines = [
        f"GPU check plan: {len(lib.STEPS)} steps in order, within --budget-s {budget_s:.0f} (issue 25: at most 8 "
        "minutes on one H100); expected seconds are estimates, each with where it comes from",
        "",
    ]
    for i, s in enumerate(lib.STEPS, 1):
        needs = f"; needs {', '.join(s.needs)}" if s.needs else ""
        lines.append(
            f"{i}. {s.name:12} ~{s.expected_s:4.0f} s (cap {s.cap_s:.0f} s, not started under {s.min_s:.0f} s"
            f"{'; CUDA' if s.cuda else ''}{needs}): {s.what}"
        )
        lines.append(f"   {'':12} estimate from: {s.source}")
    total = sum(s.expected_s for s in lib.STEPS)
    lines += [
        "",
        f"total expected: {total:.0f} s of {budget_s:.0f} s (another {lib.FINALIZE_RESERVE_S:.0f} s kept "
        "for writing the report); a step not done in its cap is killed and recorded as failed, and steps that "
        "no longer fit are skipped with the reason",
        "",
    ]
    lines.append("wheels to carry (Python 3.12, manylinux x86_64; make them with --make-wheels DIR):")
    for w in lib.WHEELS:
        lines.append(f"  {w.file}  {_mb(w.bytes)}  {w.why}")
    lines.append(f"  bitsandbytes slimmed to libbitsandbytes_cpu/_cuda13x.so: {_mb(lib.SLIM_BNB_BYTES)}")
    lines.append("not carried:")
    lines += [f"  {dist}: {why}" for dist, why in lib.NOT_CARRIED.items()]
    c = lib.carry_sizes(tree, wheel_dir)
    full = sum(w.bytes for w in lib.WHEELS)
    verdict = {None: "unknown (tree size unknown)", True: "fits", False: "does NOT fit"}[c["fits"]]
    lines += [
        "",
        f"carried per call: tree {_mb(tree)} + wheels {_mb(c['wheels_bytes'])} ({c['wheels_source']}) = "
        f"{_mb(c['total_bytes'])} of {_mb(lib.CARRY_LIMIT_BYTES)} (64 MiB): {verdict}",
        f"  with bitsandbytes' full wheel the wheels are {_mb(full)}: tree + wheels = {_mb((tree or 0) + full)}, "
        f"{'over' if (tree or 0) + full > lib.CARRY_LIMIT_BYTES else 'within'} the limit",
        "",
        "installed there, offline: python3 -m pip install --no-index --no-deps --no-compile --target WORK/site "
        "<each carried wheel whose distribution is not installed already> (unzipped if pip fails); the project "
        "itself runs from the tree (PYTHONPATH=WORK/site:REPO, pytest -p qbench.pytest_plugin), no build step",
        "",
        "on the GPU machine, one command (carry dist/gpu-wheels; timeout_s 510: the budget + 30 s for a killed step "
        "and the report):",
        "  python3 tools/gpu_check --out $OUT --wheels dist/gpu-wheels --budget-s 480",
        "  15 minutes of device time hold one start (2-3 min) and one such run; what is left reruns single steps: "
        "--only memory-nf4 --budget-s 150",
        "then: tar xzf baselines-cuda.tar.gz at the repository root, review, commit",
    ]
    return "\n".join(lines)


def make_wheels(dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    target = [
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for plat in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64"):
        target += ["--platform", plat]
    for w in lib.WHEELS:
        spec = f"{w.dist}=={w.file.split('-')[1]}"
        if w.dist == "hqq":
            cmd = [*pip, "wheel", "--no-deps", "-w", str(dest), spec]
        else:
            cmd = [*pip, "download", "--no-deps", *target, "-d", str(dest), spec]
        if subprocess.run(cmd).returncode != 0:
            print(f"could not get {spec}", file=sys.stderr)
            return 1
    for full in dest.glob("bitsandbytes-*.whl"):
        slim = full.with_name(full.name + ".slim")
        size = lib.slim_wheel(full, slim)
        slim.replace(full)
        print(f"{full.name}: slimmed to {size / 1e6:.1f} MB")
    print(lib.carry_sizes(tree_bytes(Path(__file__).resolve().parents[1]), dest))
    return 0
