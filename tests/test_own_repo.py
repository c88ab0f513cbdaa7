"""qbench in a user's own repository, as a user gets it: the built wheel in a fresh environment, `qbench init`, the
baseline update, the gate on glm-tiny, then a drift planted in the stored baseline fails the gate with its reason.

The fresh environment, offline: ``python -m venv --without-pip`` from the base interpreter, then a ``.pth`` that runs
``site.addsitedir`` on a folder of symlinks to this venv's site-packages minus qbench's editable install (its
dist-info, its ``__editable__`` finder and .pth), so the other packages' own .pth files still run and nothing leads
back to the checkout; pip (seen through that folder) installs the wheel with ``--no-index --no-deps``. The first
thing the test checks is that ``import qbench`` there resolves into the new environment, not to this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from workloads import SHORT

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.processes

# The gate's workload in the scratch repository: the project's short one (tests/workloads.py) and a prompt set of the
# repository's own (a path relative to pyproject.toml; 4 of the 13 text prompts, 8 of the 50 sums, which takes the
# greedy tasks from ~5 s to ~1 s per model here), written into [tool.qbench.workload], so the baselines are recorded
# and checked with the same workload.
WORKLOAD_TOML = (
    "\n[tool.qbench.workload]\n"
    + "".join(f"{k} = {list(v) if isinstance(v, tuple) else v}\n" for k, v in SHORT.items())
    + 'prompts = "prompts.json"\n'
)


def _small_prompt_set() -> str:
    from qbench.models.zoo import PROMPTS

    shipped = json.loads(PROMPTS.read_text(encoding="utf-8"))
    return json.dumps({**shipped, "text": shipped["text"][:4], "addition": shipped["addition"][:8]})


def _run(argv, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _editable_qbench(name: str) -> bool:
    return name.startswith(("qbench", "__editable__.qbench", "__editable___qbench"))


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> tuple[Path, dict]:
    """(python of a venv holding qbench's built wheel, the environment to run it in)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"  # built from a copy: an in-tree build would leave build/ and egg-info in the checkout
    shutil.copytree(ROOT / "qbench", src / "qbench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", src, "-w", work], work
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = work.glob("qbench-*.whl")
    venv = work / "venv"
    made = _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", venv], work)
    assert made.returncode == 0, made.stdout + made.stderr
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work).stdout.strip())
    deps = work / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not _editable_qbench(entry.name):
            (deps / entry.name).symlink_to(entry)
    (site / "qbench_test_deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QBENCH_BASELINES", "QBENCH_DEVICE")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    installed = _run([python, "-m", "pip", "install", "--no-index", "--no-deps", "-q", wheel], work, env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    where = _run([python, "-c", "import qbench; print(qbench.__file__)"], work, env)
    assert where.stdout.strip().startswith(str(site)), f"qbench came from {where.stdout.strip()} {where.stderr}"
    return python, env


def test_the_gate_in_a_users_repository(fresh_env, tmp_path):
    python, env = fresh_env
    repo = tmp_path / "my-glm-release"
    repo.mkdir()
    site = Path(python).parent.parent

    init = _run([Path(python).parent / "qbench", "init", "--method", "bnb-nf4", "--method", "bf16"], repo, env)
    assert init.returncode == 0, init.stdout + init.stderr
    assert (repo / ".github" / "workflows" / "qbench-gpu.yml").is_file()
    with (repo / "pyproject.toml").open("a", encoding="utf-8") as f:
        f.write(WORKLOAD_TOML)
    (repo / "prompts.json").write_text(_small_prompt_set(), encoding="utf-8")

    gate = [python, "-m", "pytest", "--pyargs", "qbench.gate", "-v", "-p", "no:cacheprovider"]
    update = _run([*gate, "--qbench-update-baselines"], repo, env)
    assert update.returncode == 0, update.stdout + update.stderr
    stored = repo / "baselines" / "glm-tiny" / "bnb-nf4" / "cpu" / "baseline.json"
    assert stored.is_file(), update.stdout
    # Written into the user's repository only, never beside qbench's installed package.
    assert not list(site.rglob("baseline.json")), "a baseline was written into the environment"

    # Planted: the stored KLD made 100x smaller, so today's run is far outside it; bf16 is left alone and passes.
    doc = json.loads(stored.read_text(encoding="utf-8"))
    doc["quality"]["kld_mean"] /= 100
    stored.write_text(json.dumps(doc), encoding="utf-8")
    out = repo / "out"
    judged = _run([*gate, "--qbench-json", out / "results.json", "--junitxml", out / "junit.xml"], repo, env)
    text = judged.stdout + judged.stderr
    assert judged.returncode == 1, text
    assert "test_case_passes_its_gates[glm-tiny-bf16-cpu] PASSED" in text, text
    assert "test_case_passes_its_gates[glm-tiny-bnb-nf4-cpu] FAILED" in text, text
    results = {c["id"]: c for c in json.loads((out / "results.json").read_text(encoding="utf-8"))["cases"]}
    assert results["glm-tiny-bf16-cpu"]["status"] == "pass"
    failed = results["glm-tiny-bnb-nf4-cpu"]
    assert failed["status"] == "regression", failed["reasons"]
    (reason,) = [r for r in failed["reasons"] if r.startswith("kld_mean ")]
    assert "vs baseline" in reason and "worse" in reason, reason
    assert f"glm-tiny-bnb-nf4-cpu: regression: {reason}" in text  # the verdict's own words, in pytest's output
    assert 'failures="1"' in (out / "junit.xml").read_text(encoding="utf-8")
    assert (stored.parent / "obtained.json").is_file()  # left for review; the baseline itself is not rewritten
    assert json.loads(stored.read_text(encoding="utf-8"))["quality"]["kld_mean"] == doc["quality"]["kld_mean"]
