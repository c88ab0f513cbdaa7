"""`qbench run --model` on ChatGLM3-format checkpoints (model_type ``chatglm``), no remote code: full precision and
ChatGLM's own int8/int4, built from glm-tiny by :func:`qbench.models.convert.export_chatglm`."""

from __future__ import annotations

import json

import pytest
import torch

from qbench.cli import EXIT_USAGE, main
from qbench.judge import store
from qbench.judge.tolerances import REGRESSION_TOLERANCES
from qbench.methods.chatglm import quantize_model
from qbench.models import chatglm_checkpoint, zoo
from qbench.models.convert import export_chatglm
from qbench.models.loading import load_causal_lm
from qbench.report.results import load_results

# All 4,096 positions (the bf16 perplexity is compared with glm-tiny's stored one), 2 greedy tokens: nothing here
# judges greedy output, and fresh baselines store nothing to compare it with. No noise floor: nothing here reads it
# (2.2 s a run on a 2-core AMD EPYC).
FAST = ["--in-process", "--repeat", "1", "--new-tokens", "4", "--greedy-tokens", "2", "--no-noise-floor"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm")
    glm = zoo.resolve("glm-tiny")
    return {bits: export_chatglm(glm, root / (f"int{bits}" if bits else "fp"), bits) for bits in (None, 8, 4)}


@pytest.mark.parametrize("bits", [8, 4])
def test_prequantized_weights_load_as_stored(exported, bits):
    """The stored int weights and scales are the ones qbench's own quantizer makes from the same fp32 weights:
    the directly loaded model must give bit-identical logits (a row split that moved a scale would not)."""
    ids = torch.arange(3, 67)[None]
    ours = load_causal_lm(zoo.resolve("glm-tiny"), "cpu", torch.float32)
    with torch.no_grad():
        quantize_model(ours, bits)
        direct = chatglm_checkpoint.load(exported[bits], "cpu", torch.float32, keep_bits=bits)
        assert torch.equal(ours(ids).logits, direct(ids).logits)


def test_run_on_a_full_precision_chatglm_checkpoint(exported, tmp_path):
    out = tmp_path / "r.json"
    args = ["run", "--model", str(exported[None]), "--method", "bf16", "--method", "chatglm-int8", *FAST]
    main([*args, "--json", str(out), "--baselines", str(tmp_path / "b")])
    cases = {c["method"]: c for c in load_results(out)["cases"]}
    # Same weights and tokenizer as glm-tiny: the bf16 perplexity is glm-tiny's stored one, within the drift gate's
    # own cross-kernel bound. Not tighter: the baseline may come from another CPU, whose kernels move ppl by up to
    # 2.2e-4 (qbench/judge/tolerances.py); a row mix-up in the reader moves it far more (test_convert, planted swap).
    stored = json.loads((store.default_root() / "glm-tiny" / "bf16" / "cpu" / "baseline.json").read_text())
    (ppl_tol,) = [t for t in REGRESSION_TOLERANCES if t.metric == "ppl"]
    assert abs(cases["bf16"]["quality"]["ppl"] - stored["quality"]["ppl"]) <= ppl_tol.allowed(
        stored["quality"]["ppl"], same_kernels=False
    )
    int8 = cases["chatglm-int8"]
    assert int8["status"] == "pass", int8["reasons"]
    assert int8["footprint"]["quantized_modules"] == 24 and not int8["checks"]["left_unquantized"]
    # Per-layer error read back through the ChatGLM name map (fused q/k/v rows): present for every layer.
    assert int8["quality"]["layer_rel_err_max"] is not None and int8["quality"]["layer_rel_err_max"] < 0.05


def test_run_on_a_prequantized_chatglm_checkpoint(exported, tmp_path):
    out = tmp_path / "r.json"
    args = ["run", "--model", str(exported[4]), "--method", "chatglm-int4", "--reference-model", "glm-tiny", *FAST]
    main([*args, "--json", str(out), "--baselines", str(tmp_path / "b")])
    (case,) = load_results(out)["cases"]
    assert case["status"] == "pass", case["reasons"]
    assert case["fingerprints"]["reference"].startswith("bf16@")  # scored on glm-tiny, not on the int4 weights
    # Against glm-tiny's bf16 reference the int4 drift shows (stored chatglm-int4 baseline: KLD 1.39e-3); scored
    # against its own dequantized weights it would be ~0.
    assert 3e-4 < case["quality"]["kld_mean"] < 1e-2
    assert case["estimate"]["load_note"].startswith("a prequantized ChatGLM checkpoint")


def test_bad_input_on_chatglm_checkpoints(exported, tmp_path, capsys):
    def refused(*args: str) -> str:
        assert main(["run", *args, "--in-process"]) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "qbench convert" in refused("--model", str(exported[4]), "--method", "bnb-nf4")
    assert "--method chatglm-int4" in refused("--model", str(exported[4]), "--method", "chatglm-int8")
    other = tmp_path / "other-tok"
    export_chatglm(zoo.resolve("glm-tiny"), other, 4)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"] = tok["added_tokens"][:-1]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    assert "tokenizer differs" in refused(
        "--model", str(other), "--method", "chatglm-int4", "--reference-model", "glm-tiny"
    )
    (other / "tokenizer.json").unlink()
    assert "tokenizer.json" in refused("--model", str(other), "--method", "chatglm-int4")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "pre_seq_len": 16}))
    assert "prefix tuning" in refused("--model", str(other), "--method", "chatglm-int4")


def test_pickle_only_checkpoints_are_refused_then_resaved(exported, tmp_path, capsys):
    """chatglm2-6b-int4 ships only pytorch_model.bin: `run` refuses it with the fix, and the fix keeps the int
    weights as they are (bit-identical logits)."""
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / f).write_bytes((exported[4] / f).read_bytes())
    torch.save(load_file(str(exported[4] / "model.safetensors")), pickled / "pytorch_model.bin")
    assert main(["run", "--model", str(pickled), "--method", "chatglm-int4", "--in-process"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "--keep-chatglm-format" in err and len(err.splitlines()) == 1
    resaved = tmp_path / "resaved"
    assert main(["convert", str(pickled), str(resaved), "--allow-pickle", "--keep-chatglm-format"]) == 0
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        want = chatglm_checkpoint.load(exported[4], "cpu", torch.float32, keep_bits=4)(ids).logits
        got = chatglm_checkpoint.load(resaved, "cpu", torch.float32, keep_bits=4)(ids).logits
    assert torch.equal(got, want)
    glm_bin = tmp_path / "glm-bin"  # a transformers-format directory with pickle weights only
    glm_bin.mkdir()
    (glm_bin / "config.json").write_bytes((zoo.resolve("glm-tiny") / "config.json").read_bytes())
    (glm_bin / "pytorch_model.bin").write_bytes(b"")
    capsys.readouterr()
    assert main(["run", "--model", str(glm_bin), "--in-process"]) == EXIT_USAGE
    assert "safetensors only" in capsys.readouterr().err
