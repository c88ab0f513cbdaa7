"""chatglm-int8 / chatglm-int4 as registry methods: which modules, what they store, what they compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qbench import methods
from qbench.formats import chatglm as fmt
from qbench.formats.chatglm_linear import ChatGLMQuantLinear
from qbench.measure.footprint import weights_bytes
from qbench.methods.chatglm import quantize_model
from qbench.models import zoo
from qbench.models.loading import load_causal_lm


@pytest.mark.parametrize("bits", [4, 8])
def test_glm_tiny_projections_quantized_rest_kept(bits):
    model = load_causal_lm(zoo.resolve("glm-tiny"), "cpu", torch.bfloat16)
    before = weights_bytes(model)
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    replaced = quantize_model(model, bits)
    assert sorted(replaced) == sorted(linears)  # q, k, v, o, gate_up, down in every layer
    assert len(replaced) == 6 * model.config.num_hidden_layers
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    # Footprint: each quantized weight shrinks from 2 bytes to bits/8 bytes, plus one bf16 scale per row.
    saved = sum(m.weight.numel() * (2 - bits / 8) - m.out_features * 2 for m in linears.values())
    assert weights_bytes(model) == before - saved


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_is_f_linear_of_dequantized_weight(bits):
    lin = torch.nn.Linear(64, 24, bias=True).to(torch.bfloat16)
    q = ChatGLMQuantLinear.from_linear(lin, bits)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    w = fmt.dequantize_weight(q.weight, q.weight_scale, bits)
    torch.testing.assert_close(q(x), F.linear(x, w, lin.bias), rtol=0, atol=0)
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (24, 64 // (8 // bits))
    assert sd["weight_scale"].dtype == torch.bfloat16 and sd["weight_scale"].shape == (24,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int4_layer_forward_on_cpu_dequantizes_by_table_lookup(dtype, monkeypatch):
    """The int4 layer's CPU forward goes through the lookup path and is F.linear of the dequantized weight, bit for
    bit. Planted regression: routing the CPU back to the bit-trick words fails this test."""
    lin = torch.nn.Linear(64, 24, bias=True).to(dtype)
    q = ChatGLMQuantLinear.from_linear(lin, 4)
    x = torch.randn(3, 64, dtype=dtype)
    expected = F.linear(x, fmt.dequantize_weight(q.weight, q.weight_scale, 4), lin.bias)

    def refuse(*args, **kwargs):
        raise AssertionError("a slow int4 path was taken on the CPU")

    monkeypatch.setattr(fmt, "_dequant_int4_words", refuse)
    monkeypatch.setattr(fmt, "unpack_int4", refuse)
    assert torch.equal(q(x), expected)


def test_checkpoint_tensors_load_unchanged():
    lin = torch.nn.Linear(32, 8, bias=False).to(torch.float16)
    src = ChatGLMQuantLinear.from_linear(lin, 4)
    dst = ChatGLMQuantLinear(32, 8, 4, dtype=torch.float16)
    dst.load_quantized(src.weight.clone(), src.weight_scale.clone())
    x = torch.randn(2, 32, dtype=torch.float16)
    assert torch.equal(dst(x), src(x))
    with pytest.raises(ValueError, match="do not fit"):
        dst.load_quantized(torch.zeros(8, 32, dtype=torch.int8), src.weight_scale)


def test_odd_width_is_refused_for_int4():
    with pytest.raises(ValueError, match="width must be even"):
        ChatGLMQuantLinear.from_linear(torch.nn.Linear(7, 4), 4)


def test_moe_router_and_fused_experts_stay_full_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path))
    method = methods.get("chatglm-int4")
    model = method.load(methods.LoadRequest(zoo.resolve("glm4-moe-tiny"), "cpu", "bf16"))
    names = method.quantized_modules(model)
    assert any(".shared_experts." in n for n in names) and any(".self_attn.q_proj" in n for n in names)
    assert not any(n.endswith(".mlp.gate") or ".experts." in n for n in names)
    moe = model.model.layers[1].mlp
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16
    assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_layer_errors_point_at_the_broken_layer():
    from qbench.quality.layers import layer_errors, summarize

    path = zoo.resolve("glm-tiny")
    method = methods.get("chatglm-int8")
    model = method.load(methods.LoadRequest(path, "cpu", "bf16"))
    names = method.quantized_modules(model)
    ids = torch.arange(3, 67)[None]
    healthy = layer_errors(model, names, path, ids)
    assert set(healthy) == set(names)
    # int8 per-row rounding: relative error ~ step/sqrt(12)/rms ≈ 1e-2 at most for these weights; measured ≤ 0.006.
    assert max(healthy.values()) < 0.02
    broken = "model.layers.2.mlp.down_proj"
    dict(model.named_modules())[broken].weight_scale.mul_(1.5)  # planted: one layer's scales 50% too large
    errs = layer_errors(model, names, path, ids)
    assert summarize(errs)["layer_rel_err_worst"][0][0] == broken
    assert errs[broken] > 0.4
