"""ChatGLM3-format ↔ GlmForCausalLM: logits of the converted model equal an independent implementation of
ChatGLM's own forward pass (written here from the architecture, not from either codebase's modules)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qbench.cli import EXIT_USAGE, main
from qbench.errors import UsageError
from qbench.formats import chatglm as fmt
from qbench.models import zoo
from qbench.models.convert import convert, export_chatglm


def chatglm_forward(t: dict, cc: dict, ids: torch.Tensor) -> torch.Tensor:
    """ChatGLM2/3's forward in float64 on ChatGLM-named weights (dequantizing int8/int4 ones)."""
    bits = cc.get("quantization_bit")
    heads, groups, d = cc["num_attention_heads"], cc["multi_query_group_num"], cc["kv_channels"]
    eps = cc["layernorm_epsilon"]

    def w(name):
        if bits and f"{name}.weight_scale" in t:
            return fmt.dequantize_weight(t[f"{name}.weight"], t[f"{name}.weight_scale"], bits).double()
        return t[f"{name}.weight"].double()

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()

    n = ids.shape[0]
    rot = d // 2  # ChatGLM rotates half of each head, in interleaved pairs
    inv = 1.0 / (10000.0 * cc.get("rope_ratio", 1.0)) ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]  # [n, rot/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # x [n, h, d]
        r, rest = x[..., :rot], x[..., rot:]
        r = r.reshape(n, x.shape[1], rot // 2, 2)
        x0, x1 = r[..., 0], r[..., 1]
        c, s = cos[:, None], sin[:, None]
        r = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], -1).reshape(n, x.shape[1], rot)
        return torch.cat([r, rest], -1)

    h = t["transformer.embedding.word_embeddings.weight"].double()[ids]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cc["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = rms(h, t[p + "input_layernorm.weight"])
        qkv = x @ w(p + "self_attention.query_key_value").T + t[p + "self_attention.query_key_value.bias"].double()
        q, k, v = qkv.split([heads * d, groups * d, groups * d], -1)
        q, k, v = rope(q.view(n, heads, d)), rope(k.view(n, groups, d)), v.view(n, groups, d)
        k, v = k.repeat_interleave(heads // groups, 1), v.repeat_interleave(heads // groups, 1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask
        ctx = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(n, heads * d)
        h = h + ctx @ w(p + "self_attention.dense").T
        x = rms(h, t[p + "post_attention_layernorm.weight"])
        gate, up = (x @ w(p + "mlp.dense_h_to_4h").T).chunk(2, -1)
        h = h + (torch.nn.functional.silu(gate) * up) @ w(p + "mlp.dense_4h_to_h").T
    h = rms(h, t["transformer.encoder.final_layernorm.weight"])
    return h @ t["transformer.output_layer.weight"].double().T


IDS = torch.tensor([5, 17, 33, 101, 7, 250, 600, 42, 9, 77, 3, 512])


@pytest.mark.parametrize("bits", [None, 8, 4], ids=["fp", "int8", "int4"])
def test_convert_matches_chatglm_forward(tmp_path, bits):
    src = export_chatglm(zoo.resolve("glm-tiny"), tmp_path / "chatglm", bits=bits)
    cc = json.loads((src / "config.json").read_text())
    ref = chatglm_forward(load_file(str(src / "model.safetensors")), cc, IDS)
    dst = tmp_path / "glm"
    convert(src, dst, dequantize=bits is not None, dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(IDS[None]).logits[0].double()
    diff = (got - ref).abs().max().item()
    # fp32 against float64 on logits of magnitude ~10 through 4 layers: ~1e-5 is fp32 rounding. A wrong rotary
    # layout or q/k/v split moves logits by O(1).
    assert diff < 1e-3, diff
    print(f"\n{bits or 'fp'}: max |logit diff| {diff:.2e}")


def test_round_trip_of_the_weights(tmp_path):
    src = export_chatglm(zoo.resolve("glm-tiny"), tmp_path / "c")
    convert(src, tmp_path / "g", dtype="fp32")
    a = load_file(str(zoo.resolve("glm-tiny") / "model.safetensors"))
    b = load_file(str(tmp_path / "g" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantized_without_dequantize_and_unsupported_configs(tmp_path):
    src = export_chatglm(zoo.resolve("glm-tiny"), tmp_path / "q", bits=4)
    with pytest.raises(UsageError, match="pass --dequantize"):
        convert(src, tmp_path / "out")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "pre_seq_len": 128}))
    with pytest.raises(UsageError, match="prefix tuning"):
        convert(src, tmp_path / "out2", dequantize=True)


def test_cli_convert_bad_input(tmp_path, capsys):
    d = tmp_path / "binonly"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            json.loads((zoo.resolve("glm-tiny") / "config.json").read_text())
            | {
                "model_type": "chatglm",
                "num_layers": 1,
                "padded_vocab_size": 8,
                "ffn_hidden_size": 8,
                "multi_query_group_num": 1,
            }
        )
    )
    (d / "pytorch_model.bin").write_bytes(b"")
    assert main(["convert", str(d), str(tmp_path / "out")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and len(err.strip().splitlines()) == 1


def test_the_comparison_catches_a_wrong_split(tmp_path):
    """Planted: k and v swapped in the converted checkpoint; the logits must then disagree grossly."""
    from safetensors.torch import save_file

    src = export_chatglm(zoo.resolve("glm-tiny"), tmp_path / "c")
    ref = chatglm_forward(load_file(str(src / "model.safetensors")), json.loads((src / "config.json").read_text()), IDS)
    dst = tmp_path / "g"
    convert(src, dst, dtype="fp32")
    t = load_file(str(dst / "model.safetensors"))
    for kind in ("weight", "bias"):
        k, v = f"model.layers.0.self_attn.k_proj.{kind}", f"model.layers.0.self_attn.v_proj.{kind}"
        t[k], t[v] = t[v], t[k]
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(IDS[None]).logits[0].double() - ref).abs().max().item() > 0.1


def test_shard_index_naming_missing_files_is_refused(tmp_path):
    src = export_chatglm(zoo.resolve("glm-tiny"), tmp_path / "c")
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(UsageError, match="missing shard.*model-00002-of-00002"):
        convert(src, tmp_path / "g")


@pytest.mark.parametrize("bits", [None, 8, 4], ids=["fp", "int8", "int4"])
def test_direct_load_matches_chatglm_forward(tmp_path, bits):
    """`qbench run --model CHATGLM_DIR` reads the checkpoint as it is: int weights stay int in ChatGLMQuantLinear."""
    from qbench.formats.chatglm_linear import ChatGLMQuantLinear
    from qbench.models import chatglm_checkpoint

    src = export_chatglm(zoo.resolve("glm-tiny"), tmp_path / "chatglm", bits=bits)
    cc = json.loads((src / "config.json").read_text())
    ref = chatglm_forward(load_file(str(src / "model.safetensors")), cc, IDS)
    model = chatglm_checkpoint.load(src, "cpu", torch.float32, keep_bits=bits)
    quantized = [m for m in model.modules() if isinstance(m, ChatGLMQuantLinear)]
    assert len(quantized) == (0 if bits is None else 6 * cc["num_layers"])  # q, k, v, o, gate_up, down
    with torch.no_grad():
        diff = (model(IDS[None]).logits[0].double() - ref).abs().max().item()
    assert diff < 1e-3, diff  # same bound and reason as test_convert_matches_chatglm_forward
    print(f"\n{bits or 'fp'} direct: max |logit diff| {diff:.2e}")
