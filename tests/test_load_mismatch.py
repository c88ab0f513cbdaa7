"""A checkpoint whose tensors do not match its config is an ``error`` case that names the keys, never a drift figure.

transformers only logs missing and unexpected keys and runs the model on uninitialised weights: issue 13 found
qbench passing ``quantization_config=None``, which made transformers ignore a pre-quantized checkpoint's own
quantization config, so every packed tensor was "unexpected" and the case showed a KLD of 5 as if the method were bad.

Planted regression: dropping ``check_loading_info`` from ``load_causal_lm`` makes both tests here fail (the load
succeeds and the case gets a drift verdict); passing ``quantization_config=None`` explicitly again makes
``test_explicit_none_is_not_passed`` fail.
"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from qbench.cli import main
from qbench.models import zoo
from qbench.models.loading import CheckpointMismatch, load_causal_lm


@pytest.fixture(scope="module")
def renamed(tmp_path_factory):
    """glm-tiny with one weight renamed: that weight is missing and the renamed one unexpected."""
    dst = tmp_path_factory.mktemp("mismatch") / "glm-tiny-renamed"
    shutil.copytree(zoo.GLM_TINY_DIR, dst)
    tensors = load_file(dst / "model.safetensors")
    key = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[key.replace("down_proj", "down_projection")] = tensors.pop(key)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst, key


def test_load_names_missing_and_unexpected_keys(renamed):
    path, key = renamed
    with pytest.raises(CheckpointMismatch) as e:
        load_causal_lm(path, "cpu", None)
    msg = str(e.value)
    assert f"1 missing (left uninitialised): {key}" in msg
    assert key.replace("down_proj", "down_projection") in msg and "unexpected" in msg


def test_mismatched_checkpoint_is_an_error_case(renamed, tmp_path):
    path, key = renamed
    out = tmp_path / "r.json"
    argv = ["run", "--in-process", "--model", str(path), "--method", "bf16", "--repeat", "1", "--new-tokens", "2"]
    rc = main([*argv, "--context", "8", "--json", str(out), "--baselines", str(tmp_path / "b")])
    cases = json.loads(out.read_text())["cases"]
    assert rc != 0
    assert [c["status"] for c in cases] == ["error"] * len(cases) and cases
    assert all(key in " ".join(c["reasons"]) for c in cases), cases[0]["reasons"]


def test_explicit_none_is_not_passed(monkeypatch):
    """Without a method's quantization config, from_pretrained must not see the keyword at all."""
    import transformers

    seen = {}

    def spy(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.raises(RuntimeError, match="stop"):
        load_causal_lm(zoo.GLM_TINY_DIR, "cpu", None)
    assert "quantization_config" not in seen and seen.get("output_loading_info") is True
