"""``gptq``, ``awq``, ``fp8``: registered everywhere, estimated from a checkpoint's quantization_config, and, where
they cannot run, skipped with the reason a user acts on (the library with its pip extra, or the device).

qbench's own environment has neither GPTQModel nor ``kernels`` (GPTQModel pins numpy and more: it lives in
``nox -s gptq-checkpoint``'s venv), so the load paths themselves are exercised there, not here; the libraries'
presence is simulated through ``qbench.methods.libraries.find_spec`` where a test needs it.
"""

from __future__ import annotations

import json

import pytest
import torch

from qbench import methods
from qbench.cli import main
from qbench.methods import gptqmodel_checkpoints, libraries
from qbench.models import zoo

GPTQ_DIR = zoo.DATA_DIR / "glm-tiny-gptq"
needs_checkpoint = pytest.mark.skipif(
    not (GPTQ_DIR / "config.json").is_file(),
    reason=f"qbench's GPTQ checkpoint of glm-tiny is not at {GPTQ_DIR} (make it with `nox -s gptq-checkpoint`)",
)


@pytest.fixture
def present(monkeypatch):
    """``present("gptqmodel")``: from now on the import check finds these modules (at a version qbench accepts)."""
    real = libraries.find_spec

    def show(*modules: str) -> None:
        monkeypatch.setattr(libraries, "find_spec", lambda name: object() if name in modules else real(name))
        monkeypatch.setattr(libraries.importlib.metadata, "version", lambda dist: "99.0")

    return show


def test_gptq_and_awq_need_gptqmodel_and_name_its_extra(without):
    without("gptqmodel")
    for device in ("cpu", "cuda", "cuda:1"):
        assert methods.get("gptq").unavailable(device) == "gptqmodel is not installed: pip install 'qbench[gptqmodel]'"
    for device in ("cuda", "cuda:1"):
        assert methods.get("awq").unavailable(device) == "gptqmodel is not installed: pip install 'qbench[gptqmodel]'"


def test_gptq_runs_on_cpu_and_cuda_awq_on_cuda_only(present):
    present("gptqmodel")
    assert methods.get("gptq").unavailable("cpu") is None
    assert methods.get("gptq").unavailable("cuda:0") is None
    assert "runs on cpu and cuda" in methods.get("gptq").unavailable("mps")
    assert methods.get("awq").unavailable("cuda:0") is None
    assert methods.get("awq").unavailable("cpu") == (
        "awq runs on CUDA only: GPTQModel 7.6's AWQ kernels (AwqGEMMLinear and the others) need CUDA; its torch "
        "fallback for cpu is unvalidated, since GPTQModel packs AWQ checkpoints on CUDA only"
    )


def test_fp8_is_cuda_only_with_the_reason(present, without, monkeypatch):
    """On a CPU (or a GPU below compute capability 8.9) transformers would load the FP8 checkpoint as bf16: the
    reason says so whether or not the kernels package is there; on a capable GPU it is the kernels package."""
    fp8 = methods.get("fp8")
    present("kernels")
    assert fp8.unavailable("cpu") == (
        "fp8 runs on CUDA only: on cpu transformers' FineGrainedFP8HfQuantizer loads an FP8 checkpoint dequantized "
        "to bf16 (transformers 5.24), which would measure bf16, not FP8"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert fp8.unavailable("cuda:0").startswith("fp8 needs compute capability >= 8.9; cuda:0 has 8.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.unavailable("cuda:0") is None
    without("kernels")
    assert fp8.unavailable("cuda:0") == "kernels is not installed: pip install 'qbench[fp8]'"


def test_listing_shows_the_three_with_their_reasons(without, capsys):
    without("gptqmodel", "kernels")
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    for name in ("gptq", "awq", "fp8"):
        assert rows[name].split()[1:3] == [name, "unavailable"]
    assert out.count("cpu: gptqmodel is not installed: pip install 'qbench[gptqmodel]'") == 1  # gptq
    assert "cpu: awq runs on CUDA only" in out and "cpu: fp8 runs on CUDA only" in out


@needs_checkpoint
def test_glm_tiny_means_the_shipped_gptq_checkpoint_in_gptqmodels_layout():
    """``--model glm-tiny --method gptq`` loads glm-tiny-gptq, which splits gate_up_proj (so it loads through
    GPTQModel.load, and needs no optimum)."""
    m = methods.get("gptq")
    tiny = zoo.resolve("glm-tiny")
    assert m.checkpoint_for(tiny) == GPTQ_DIR
    assert m.checkpoint_problem(tiny) is None
    assert gptqmodel_checkpoints.splits_fused_mlp(GPTQ_DIR) and not gptqmodel_checkpoints.splits_fused_mlp(tiny)


def test_checkpoints_a_method_cannot_read_are_refused_with_the_fix(tmp_path):
    tiny = zoo.resolve("glm4-tiny")  # no quantization_config and nothing shipped for it
    for name in ("gptq", "awq", "fp8"):
        assert "has no quantization_config" in methods.get(name).checkpoint_problem(tiny)
    cfg = json.loads((zoo.resolve("glm-tiny") / "config.json").read_text(encoding="utf-8"))
    for name, qc, needle in (
        ("awq", {"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
        ("awq", {"quant_method": "awq", "version": "gemv_fast"}, "GEMM format"),
        ("gptq", {"quant_method": "gptq", "checkpoint_format": "marlin"}, "gptq/gptq_v2 format"),
        ("fp8", {"quant_method": "fp8", "dequantize": True}, "loads as bf16"),
    ):
        (tmp_path / "config.json").write_text(json.dumps(cfg | {"quantization_config": qc}), encoding="utf-8")
        assert needle in methods.get(name).checkpoint_problem(tmp_path), name
