"""glm4-moe-tiny, the trained GLM-4.5-layout mixture of experts that ships in the package: its layout, its MTP
layer, what transformers makes of it, and that it is a language model whose experts are all used (the figures its
TRAINING.json records, recomputed here)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qbench.models import zoo
from qbench.models.train import heldout_ppl
from qbench.models.train_moe import expert_load

NAME = "glm4-moe-tiny"
# Every routed expert of every MoE layer gets at least this share of the top-k choices over eval.txt: half the
# uniform 1/8. The shipped model's least-used expert gets 0.118 (its TRAINING.json). The aux-loss-free balancing
# (qbench/models/train_moe.py) is what this checks: in the shipped run's first 250 steps, before the router biases
# had moved far, the least-used expert got 0.000-0.016 of a step's choices (its training log).
MIN_SHARE = 1 / 8 / 2
# A recomputed share may differ from the recorded one (rounded to 4 decimals: 5e-5) where a top-k choice flips between
# two experts with near-equal scores under another CPU's summation order: each flip moves a share by 1/(2 x 5,301
# tokens of eval.txt) ~ 9e-5, so 0.005 allows ~50 flips per expert; another checkpoint or a broken router misses it
# by far more (measured here: 4.9e-5, the rounding).
SHARE_TOLERANCE = 0.005


@pytest.fixture(scope="module")
def shipped():
    d = zoo.resolve(NAME)
    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    record = json.loads((d / "TRAINING.json").read_text(encoding="utf-8"))
    return d, model.eval(), info, config, record


def _stored(path) -> dict:
    """The safetensors header: tensor name → {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def test_it_ships_in_the_glm45_layout(shipped):
    d, model, _, config, record = shipped
    assert zoo.ZOO[NAME].config is None  # shipped, not built on demand
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "TRAINING.json"} <= names
    assert (d / "model.safetensors").stat().st_size <= 8 * 2**20  # the budget: a few MB
    assert type(model).__name__ == "Glm4MoeForCausalLM" and config["architectures"] == ["Glm4MoeForCausalLM"]
    layout = {
        "first_k_dense_replace": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 1,
    }
    assert {k: config[k] for k in layout} == layout
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert type(model.model.layers[0].mlp).__name__ == "Glm4MoeMLP"
    assert all(type(layer.mlp).__name__ == "Glm4MoeMoE" for layer in model.model.layers[1:])
    assert f"qbench zoo train {NAME}" in record["command"]
    # glm-tiny's tokenizer: the two models read the same prompts and held-out text as the same token ids
    assert AutoTokenizer.from_pretrained(d).get_vocab() == AutoTokenizer.from_pretrained(zoo.GLM_TINY_DIR).get_vocab()


def test_the_mtp_layer_is_in_the_checkpoint_under_glm45s_names(shipped):
    d, _, _, config, _ = shipped
    stored = _stored(d / "model.safetensors")
    mtp = f"model.layers.{config['num_hidden_layers']}."
    hidden, experts = config["hidden_size"], config["n_routed_experts"]
    assert stored[mtp + "eh_proj.weight"]["shape"] == [hidden, 2 * hidden]
    for name in ("enorm", "hnorm", "shared_head.norm", "input_layernorm", "post_attention_layernorm"):
        assert stored[f"{mtp}{name}.weight"]["shape"] == [hidden]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"{mtp}self_attn.{name}.weight" in stored
    assert stored[mtp + "mlp.gate.weight"]["shape"] == [experts, hidden]
    assert stored[mtp + "mlp.gate.e_score_correction_bias"]["dtype"] == "F32"  # as the main layers' routers
    for e in range(experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert f"{mtp}mlp.experts.{e}.{name}.weight" in stored
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"{mtp}mlp.shared_experts.{name}.weight" in stored


def test_transformers_loads_the_model_and_leaves_out_only_the_mtp_layer(shipped):
    """transformers ignores GLM-4.5's MTP layer by its number (92, or GLM-4.5-Air's 46) and reports this one's as
    unexpected: everything else loads, nothing is missing."""
    _, _, info, config, _ = shipped
    mtp = f"model.layers.{config['num_hidden_layers']}."
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(k.startswith(mtp) for k in info["unexpected_keys"])


def test_it_is_a_language_model_whose_experts_are_all_used(shipped):
    d, model, _, _, record = shipped
    tok = AutoTokenizer.from_pretrained(d)
    ids = torch.tensor(tok(zoo.EVAL_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    seq_len = record["config"]["seq_len"]
    loads = expert_load(model, ids, seq_len)
    recorded = record["expert_load"]["layers"]
    assert set(loads) == {n for n in recorded if int(n.split(".")[2]) < model.config.num_hidden_layers}
    for layer, shares in loads.items():
        assert shares == pytest.approx(recorded[layer], abs=SHARE_TOLERANCE), layer
    assert record["expert_load"]["min_share"] >= MIN_SHARE
    assert all(s >= MIN_SHARE for shares in recorded.values() for s in shares)
    assert min(s for shares in loads.values() for s in shares) >= MIN_SHARE - SHARE_TOLERANCE
    # "Far below uniform", as for glm-tiny (tests/test_zoo.py): a model that learned nothing scores ~1024.
    ppl = heldout_ppl(model, ids, seq_len)
    # Recorded from the same bf16-rounded weights in float32 (train_moe.MoeRecipe.finish), to 4 decimals; 1e-3
    # leaves room for another CPU's summation order and a few flipped expert choices.
    assert ppl == pytest.approx(record["heldout_ppl"], rel=1e-3)
    assert ppl < record["uniform_ppl"] / 50, (ppl, record["uniform_ppl"])


def test_the_package_ships_it():
    """Every file of the shipped directory matches pyproject's package-data for qbench.models (a wheel without them
    would answer `--model glm4-moe-tiny` with "missing from the package")."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="tomllib (Python >= 3.11) reads pyproject.toml")
    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["qbench.models"]
    for f in zoo.resolve(NAME).iterdir():
        rel = f.relative_to(root / "qbench" / "models").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel
