"""torchao-int8wo and torchao-fp8wo quantize glm4-moe-tiny's fused 3-D routed experts (issue 23 item 2).

transformers 5.25 stores a layer's routed experts as ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``down_proj``
[E, H, I]; ``TorchAoConfig`` leaves them in bf16. qbench.methods.torchao quantizes them after loading with torchao's
``FqnToConfig`` (an ``Int8Tensor`` / ``Float8Tensor`` with one fp32 scale per expert and output row), switches the
experts to transformers' eager implementation (torchao 0.18's tensors implement neither the ``grouped_mm`` path's
``aten.transpose`` nor the ``batched_mm`` path's ``aten.bmm``) and runs their forward outside ``torch.inference_mode``
(the eager loop's ``gate_up_proj[i]`` view of the tensor subclass raises ``Cannot set version_counter for inference
tensor`` inside it).

Planted, by hand: ``inference_mode_safe`` made a no-op fails test_inference_mode_forward_equals_no_grad with that
RuntimeError; ``fused_expert_params`` returning [] (the experts skipped) fails the format, bytes-per-role and CLI
tests and the wrapper test (routed_experts stays bfloat16: 2,359,296 measured bytes against the estimate's 1,225,728).
"""

from __future__ import annotations

import pytest
import torch
from cli_runner import run_cli

from qbench import methods
from qbench.measure.estimate import estimate
from qbench.measure.footprint import bytes_by_role, fused_full_precision, weights_bytes
from qbench.methods import torchao as ao
from qbench.methods.registry import LoadRequest
from qbench.models import roles, zoo

pytest.importorskip("torchao", reason="torchao is an optional extra: pip install 'qbench[torchao]'")

MODEL = "glm4-moe-tiny"
# the tensor subclass each method stores a fused expert tensor as, and its data dtype
FORMATS = {"torchao-int8wo": ("Int8Tensor", torch.int8), "torchao-fp8wo": ("Float8Tensor", torch.float8_e4m3fn)}
IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 8, 9, 61, 2]])


@pytest.fixture(scope="module", params=list(FORMATS))
def loaded(request):
    name = request.param
    if (why := methods.get(name).unavailable("cpu")) is not None:
        pytest.skip(f"{name} cannot run here: {why}")
    model = methods.get(name).load(LoadRequest(zoo.resolve(MODEL), "cpu", "bf16"))
    return name, model


def _experts(model) -> dict[str, torch.Tensor]:
    layers = roles.decoder_layers(model.config)
    return {n: p for n, p in model.named_parameters() if roles.is_fused_expert(n, p.shape, layers)}


def test_experts_stored_in_torchao_format(loaded):
    name, model = loaded
    kind, dtype = FORMATS[name]
    experts = _experts(model)
    config = model.config
    assert len(experts) == 2 * (config.num_hidden_layers - config.first_k_dense_replace)
    for n, t in experts.items():
        assert type(t).__name__ == kind, (n, type(t))
        e, rows, _ = t.shape
        assert t.qdata.dtype == dtype and t.qdata.shape == t.shape
        assert t.scale.dtype == torch.float32 and t.scale.shape == (e, rows, 1)  # one scale per expert and row
    assert fused_full_precision(model, roles.decoder_layers(config)) == []
    assert model.get_experts_implementation()[""] == "eager"
    # the experts modules count among the quantized ones, beside the linears (attention, dense MLP, shared experts)
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and type(m.weight).__name__ == kind}
    owners = {n.rpartition(".")[0] for n in experts}
    assert sorted(methods.get(name).quantized_modules(model)) == sorted(linears | owners)


def test_bytes_per_role_equal_the_estimate(loaded):
    name, model = loaded
    measured = bytes_by_role(model, roles.decoder_layers(model.config))
    assert sum(r["bytes"] for r in measured.values()) == weights_bytes(model)
    est = estimate(zoo.resolve(MODEL), name, 8, 1, 2, "cpu")
    assert {k: r["bytes"] for k, r in est["roles"].items()} == {k: r["bytes"] for k, r in measured.items()}
    assert list(measured["routed_experts"]["formats"]) == [FORMATS[name][0]]
    assert est["left_full_precision"] == {}


def test_inference_mode_forward_equals_no_grad(loaded):
    _, model = loaded
    with torch.no_grad():
        want = model(IDS).logits
    with torch.inference_mode():
        got = model(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_without_the_wrapper_inference_mode_fails(loaded):
    """The fix is needed: the same experts module with its original class fails inside inference mode."""
    _, model = loaded
    experts = model.model.layers[1].mlp.experts
    safe = type(experts)
    experts.__class__ = safe.__mro__[1]
    try:
        with torch.inference_mode(), pytest.raises(RuntimeError, match="version_counter for inference tensor"):
            model(IDS)
    finally:
        experts.__class__ = safe


def test_dense_model_takes_the_old_path():
    """glm-tiny has no fused experts: nothing is quantized after loading and its experts setting is left alone."""
    model = methods.get("bf16").load(LoadRequest(zoo.resolve("glm-tiny"), "cpu", "bf16"))
    before = model.get_experts_implementation()
    assert ao.fused_expert_params(model) == []
    assert methods.get("torchao-int8wo").quantize_fused_experts(model, "cpu") == []
    assert model.get_experts_implementation() == before
    assert not any(type(m).__name__.startswith("InferenceModeSafe") for m in model.modules())


def test_methods_says_which_torchao_methods_quantize_the_experts(capsys):
    out = run_cli(capsys, "methods", "--model", MODEL).out
    lines = out.splitlines()

    def experts_line(name: str) -> str:
        i = next(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
        return next(line for line in lines[i + 1 :] if "routed experts:" in line)

    assert experts_line("torchao-int8wo").strip() == "routed experts: quantized"
    assert experts_line("torchao-fp8wo").strip() == "routed experts: quantized"
    int4 = experts_line("torchao-int4wo")
    assert "left in full precision (torchao 0.18" in int4 and "parameter quantization" in int4, int4
