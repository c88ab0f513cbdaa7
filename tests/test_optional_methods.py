"""Methods backed by optional libraries (torchao, optimum-quanto) say whether they run here and, when not, why in
words a user acts on; a case of such a method is ``skipped`` with that reason, and nothing is loaded for it. Where
the library is installed, the integrity checks see its quantized modules (and the ones it left alone).

A missing library is simulated by replacing the import check (``qbench.methods.libraries.find_spec``), so these
tests run whether or not the libraries are installed.
"""

from __future__ import annotations

import json

import pytest
import torch

from qbench import methods
from qbench.case import Case
from qbench.cli import main
from qbench.errors import UsageError
from qbench.measure import estimate as est
from qbench.methods import libraries
from qbench.run import RunConfig, execute_case, run_cases
from qbench.run.workload import Workload

TORCHAO = ("torchao-int8wo", "torchao-int4wo", "torchao-fp8wo")
QUANTO = ("quanto-int8", "quanto-int4", "quanto-fp8")
HQQ = ("hqq-4bit", "hqq-8bit")
ALWAYS = ("bf16", "fp16", "fp32", "bnb-nf4", "bnb-int8", "chatglm-int8", "chatglm-int4")
MISSING = {
    "torchao": "torchao is not installed: pip install 'qbench[torchao]'",
    "optimum.quanto": "optimum-quanto is not installed: pip install 'qbench[quanto]'",
    "hqq": "hqq is not installed: pip install 'qbench[hqq]'",
}


def test_every_method_answers_and_the_built_in_ones_always_run():
    for name in methods.names():
        why = methods.get(name).unavailable("cpu")
        assert why is None or (isinstance(why, str) and why and "\n" not in why), (name, why)
    for name in ALWAYS:
        assert methods.get(name).unavailable("cpu") is None


@pytest.mark.parametrize("module, names", [("torchao", TORCHAO), ("optimum.quanto", QUANTO), ("hqq", HQQ)])
def test_a_missing_library_names_its_pip_extra(without, module, names):
    without(module)
    for name in names:
        for device in ("cpu", "cuda", "cuda:1"):
            assert methods.get(name).unavailable(device) == MISSING[module]
    other = QUANTO if names == TORCHAO else TORCHAO  # the other family does not depend on it
    if all(libraries.find_spec(m) is not None for m in ("torchao", "optimum.quanto")):
        assert all(methods.get(n).unavailable("cpu") is None for n in other)


def test_a_library_too_old_says_which_version_is_needed(monkeypatch):
    monkeypatch.setattr(libraries, "find_spec", lambda name: object())
    monkeypatch.setattr(libraries.importlib.metadata, "version", lambda dist: "0.12.0")
    assert methods.get("torchao-int8wo").unavailable("cpu") == (
        "torchao 0.12.0 is installed; qbench needs torchao >= 0.18: pip install 'qbench[torchao]'"
    )
    monkeypatch.setattr(libraries.importlib.metadata, "version", lambda dist: "0.2.6")
    assert "optimum-quanto 0.2.6 is installed; qbench needs optimum-quanto >= 0.2.7" in methods.get(
        "quanto-int4"
    ).unavailable("cpu")
    monkeypatch.setattr(libraries.importlib.metadata, "version", lambda dist: "0.2.7")
    assert methods.get("hqq-4bit").unavailable("cpu") == (
        "hqq 0.2.7 is installed; qbench needs hqq >= 0.2.8: pip install 'qbench[hqq]'"
    )
    monkeypatch.setattr(libraries.importlib.metadata, "version", lambda dist: "0.18.0.dev20260101+cu128")
    assert methods.get("torchao-int8wo").unavailable("cpu") is None


def test_int4_on_a_gpu_without_the_tinygemm_kernel_names_the_capability(monkeypatch):
    monkeypatch.setattr(libraries, "find_spec", lambda name: object())  # the library question is not this test's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    why = methods.get("torchao-int4wo").unavailable("cuda:0")
    assert why == (
        "torchao's tinygemm int4 kernel (aten._weight_int4pack_mm) needs compute capability >= 8.0; cuda:0 has 7.5"
    )
    assert methods.get("torchao-int8wo").unavailable("cuda:0") is None  # weight-only int8 needs no such kernel
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert methods.get("torchao-int4wo").unavailable("cuda") is None
    assert "runs on cpu and cuda" in methods.get("torchao-int4wo").unavailable("mps")


def test_methods_listing_shows_availability_and_the_reason(without, capsys):
    without("torchao")
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert set(methods.names()) <= set(rows)
    for name in TORCHAO:
        assert rows[name].split()[1:3] == ["torchao", "unavailable"]
    assert rows["bf16"].split()[1:3] == ["reference", "available"]
    assert out.count(f"cpu: {MISSING['torchao']}") == len(TORCHAO)


def test_a_case_of_an_unavailable_method_is_skipped_with_the_reason(without, tmp_path, monkeypatch):
    without("torchao", "optimum.quanto")

    def no_loading(*args, **kwargs):
        raise AssertionError("nothing may be loaded for a skipped case")

    monkeypatch.setattr(methods.get("torchao-int4wo"), "load", no_loading)
    case = Case("glm-tiny", "torchao-int4wo", "cpu", "bf16")
    result = execute_case(case, None, RunConfig())  # the pytest drift matrix's path: no context needed
    assert (result["status"], result["reasons"]) == ("skipped", [MISSING["torchao"]])

    # qbench run's path: skipped before the reference is scored, so a run of only such methods loads nothing.
    monkeypatch.setattr("qbench.run.engine.score_reference", no_loading)
    wl = Workload(repeat=1, warmup=0, new_tokens=2)
    doc = run_cases(RunConfig(methods=["torchao-int4wo", "quanto-fp8"], baselines=tmp_path, workload=wl))
    got = {c["method"]: (c["status"], c["reasons"]) for c in doc["cases"]}
    assert got == {
        "torchao-int4wo": ("skipped", [MISSING["torchao"]]),
        "quanto-fp8": ("skipped", [MISSING["optimum.quanto"]]),
    }
    json.dumps(doc)


def test_run_cli_exits_0_and_records_the_skip(without, tmp_path, capsys):
    without("optimum.quanto")
    out = tmp_path / "r.json"
    argv = ["run", "--in-process", "--method", "quanto-int4", "--repeat", "1", "--json", str(out)]
    assert main([*argv, "--baselines", str(tmp_path / "b")]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    assert case["status"] == "skipped" and case["reasons"] == [MISSING["optimum.quanto"]]
    assert "skipped" in capsys.readouterr().out


def test_estimate_without_the_library_is_a_usage_error_with_the_reason(without):
    without("optimum.quanto")
    with pytest.raises(UsageError, match=r"--method quanto-int8: optimum-quanto is not installed: pip install"):
        est.estimate("glm-tiny", "quanto-int8")


# --- integrity: what the gate's checks read ----------------------------------------------------------------------


def _installed(name: str) -> methods.Method:
    m = methods.get(name)
    if (why := m.unavailable("cpu")) is not None:
        pytest.skip(f"{name}: {why}")
    return m


@pytest.mark.parametrize("name", ["torchao-int4wo", "quanto-int8"])
def test_quantized_and_left_unquantized_modules(name, monkeypatch):
    """glm-tiny's 24 linears (4 layers × q, k, v, o, gate_up, down) quantized, lm_head not; a skip list that also
    catches one projection leaves exactly that one, which ``left_unquantized`` names."""
    from qbench.models import zoo

    m = _installed(name)
    path = zoo.resolve("glm-tiny")
    model = m.load(methods.LoadRequest(path, "cpu", "bf16"))
    quantized = m.quantized_modules(model)
    assert len(quantized) == 24 and "lm_head" not in quantized and m.left_unquantized(model) == []
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and type(head.weight) is torch.nn.Parameter

    config = type(m).config
    skip = ["lm_head", "model.layers.1.mlp.down_proj"]

    def skipping(self, *args):
        cfg = config(self, *args)
        cfg.modules_to_not_convert = skip
        return cfg

    monkeypatch.setattr(type(m), "config", skipping)
    model = m.load(methods.LoadRequest(path, "cpu", "bf16"))
    assert m.left_unquantized(model) == ["model.layers.1.mlp.down_proj"]
    assert len(m.quantized_modules(model)) == 23


# --- hqq: its own API until transformers' HqqConfig quantizes, then transformers' ------------------------------------


def test_hqq_switches_to_transformers_hqqconfig_once_its_quantizer_works(monkeypatch):
    """transformers 5.24's HQQ quantizer has no quantize operation, so hqq's own HQQLinear is used; a transformers
    whose quantizer answers (simulated: ``get_quantize_ops`` patched) gets ``HqqConfig`` with the same settings.
    Fails when ``load`` stops asking transformers (planted once: ``why = "planted"`` in ``load`` quantized with
    hqq's own API after the patch too, and the test failed there)."""
    from transformers import HqqConfig
    from transformers.quantizers.quantizer_hqq import HqqHfQuantizer

    from qbench.methods import hqq
    from qbench.models import zoo

    m = _installed("hqq-4bit")
    calls = []

    def fake_load(path, device, dtype, quantization_config=None, **kwargs):
        calls.append(quantization_config)
        return "model"

    monkeypatch.setattr(hqq, "load_causal_lm", fake_load)
    monkeypatch.setattr(type(m), "quantize", lambda self, model, dtype: calls.append(("hqq's own", dtype)))
    req = methods.LoadRequest(zoo.resolve("glm-tiny"), "cpu", "bf16")
    real = hqq.transformers_problem()
    if real is not None:  # transformers 5.24: the loader raises "... is not available yet and will be supported soon"
        assert "not available yet" in real
        assert m.load(req) == "model" and calls == [None, ("hqq's own", torch.bfloat16)]
        calls.clear()

    monkeypatch.setattr(HqqHfQuantizer, "get_quantize_ops", lambda self: {}, raising=False)
    assert hqq.transformers_problem() is None
    assert m.load(req) == "model" and len(calls) == 1
    (cfg,) = calls
    assert isinstance(cfg, HqqConfig) and cfg.skip_modules == ["lm_head"]
    wq = cfg.quant_config["weight_quant_params"]
    assert (wq["nbits"], wq["group_size"], wq["axis"]) == (4, 64, 1)


def test_hqq_quantizes_every_linear_but_lm_head_and_computes_in_bf16():
    """glm-tiny's 24 linears become HQQLinear, lm_head stays a plain bf16 nn.Linear, the dequantized weights are
    bf16; a projection put back in full precision is named by ``left_unquantized``."""
    from hqq.core.quantize import HQQLinear

    from qbench.models import zoo

    m = _installed("hqq-8bit")
    model = m.load(methods.LoadRequest(zoo.resolve("glm-tiny"), "cpu", "bf16"))
    quantized = m.quantized_modules(model)
    assert len(quantized) == 24 and "lm_head" not in quantized and m.left_unquantized(model) == []
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.bfloat16
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, HQQLinear) and q.dequantize().dtype == torch.bfloat16
    assert (q.meta["nbits"], q.meta["group_size"], q.meta["axis"]) == (8, 64, 1)
    with torch.inference_mode():
        assert model(input_ids=torch.arange(3, 11)[None]).logits.dtype == torch.bfloat16

    down = model.get_submodule("model.layers.1.mlp.down_proj")
    model.get_submodule("model.layers.1.mlp").down_proj = torch.nn.Linear(
        down.in_features, down.out_features, bias=False, dtype=torch.bfloat16
    )
    assert m.left_unquantized(model) == ["model.layers.1.mlp.down_proj"]
    assert len(m.quantized_modules(model)) == 23
