"""The zoo: the shipped glm-tiny is a real language model of its corpus; the random-init GLM-4 models load
and quantize; a few training steps of the training command work."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qbench import methods
from qbench.models import corpus, zoo
from qbench.models.train import TrainConfig, heldout_ppl, train


def test_glm_tiny_ships_as_an_ordinary_checkpoint():
    d = zoo.resolve("glm-tiny")
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "TRAINING.json"} <= names
    assert sum(p.stat().st_size for p in d.iterdir()) <= 16 * 2**20
    assert json.loads((d / "config.json").read_text())["architectures"] == ["GlmForCausalLM"]
    assert "qbench zoo train glm-tiny" in json.loads((d / "TRAINING.json").read_text())["command"]


def test_glm_tiny_is_a_real_language_model():
    d = zoo.resolve("glm-tiny")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    ids = torch.tensor(tok(zoo.EVAL_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    ppl = heldout_ppl(model, ids[:2049], 256)
    uniform = len(tok)
    # "Far below uniform": a model that learned nothing scores ~uniform; glm-tiny is measured near 7.
    assert ppl < uniform / 50, (ppl, uniform)


def test_corpus_is_deterministic_and_bilingual():
    a, b = corpus.text(3, 200), corpus.text(3, 200)
    assert a == b and a != corpus.text(4, 200)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in a) and "+" in a and " ." in a
    for line in a.splitlines():
        if "+" in line:
            lhs, rhs = line.split("=")
            x, y = lhs.split("+")
            assert int(x) + int(y) == int(rhs)


def test_a_few_training_steps(tmp_path):
    cfg = TrainConfig(steps=3, batch=2, seq_len=32, train_lines=300, vocab_size=300, warmup=1)
    record = train(tmp_path / "m", cfg, log=lambda s: None)
    assert record["parameters"] > 0 and math.isfinite(record["final_train_loss"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "GlmForCausalLM"
    assert tok.decode(tok("37+45=82")["input_ids"]) == "37+45=82"


@pytest.mark.parametrize(("name", "arch"), [("glm4-tiny", "Glm4ForCausalLM"), ("glm4-moe-tiny", "Glm4MoeForCausalLM")])
def test_zoo_models_load_and_quantize(name, arch, tmp_path, monkeypatch):
    """glm4-tiny is built on first use (random weights), glm4-moe-tiny ships trained: both load and quantize."""
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path))
    path = zoo.resolve(name)
    assert zoo.resolve(name) == path  # built once (or shipped), then reused
    method = methods.get("bnb-nf4")
    model = method.load(methods.LoadRequest(path, "cpu", "bf16"))
    assert type(model).__name__ == arch
    assert method.quantized_modules(model)
    out = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(out).all()
