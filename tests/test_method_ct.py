"""The compressed-tensors methods (``ct-w4a16``, ``ct-w8a8``) and their base, :mod:`qbench.methods.prequantized`: which
checkpoint a case loads, what is refused before loading (one line, with the fix), and that the loaded model holds
the checkpoint's quantized tensors and keeps them through the forward passes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qbench import methods
from qbench.errors import UsageError
from qbench.measure import estimate as est
from qbench.measure.footprint import weights_bytes
from qbench.methods import compressed_tensors as ct
from qbench.methods import libraries
from qbench.models import zoo
from qbench.run import RunConfig

NAMES = ("ct-w4a16", "ct-w8a8")
TINY = zoo.GLM_TINY_DIR
SHIPPED = {"ct-w4a16": zoo.DATA_DIR / "glm-tiny-ct-w4a16", "ct-w8a8": zoo.DATA_DIR / "glm-tiny-ct-w8a8"}


def _needs_library(name: str) -> None:
    if (why := methods.get(name).unavailable("cpu")) is not None:
        pytest.skip(f"{name}: {why}")


def _copy(src, dst, edit=None):
    """A copy of checkpoint ``src`` at ``dst`` with its config.json's quantization_config edited by ``edit``."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    if edit is not None:
        edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dst


# --- which checkpoint, and what is refused --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_glm_tiny_means_the_shipped_checkpoint_and_a_quantized_one_itself(name):
    m = methods.get(name)
    assert m.checkpoint_problem(TINY) is None and m.checkpoint_for(TINY) == SHIPPED[name]
    assert m.checkpoint_problem(SHIPPED[name]) is None and m.checkpoint_for(SHIPPED[name]) == SHIPPED[name]


def test_a_checkpoint_without_quantization_config_is_refused_with_the_fix(tmp_path):
    plain = _copy(TINY, tmp_path / "my-glm")  # glm-tiny's weights elsewhere: no shipped counterpart there
    why = methods.get("ct-w4a16").checkpoint_problem(plain)
    assert why.startswith(f"{plain} has no quantization_config: ct-w4a16 judges a checkpoint already quantized")
    assert "--reference-model" in why and "\n" not in why


def test_the_other_schemes_checkpoint_is_refused_naming_the_method_that_reads_it():
    assert (
        methods.get("ct-w4a16")
        .checkpoint_problem(SHIPPED["ct-w8a8"])
        .endswith(
            "this one is compressed-tensors int-quantized, int8 weights per channel, int8 activations: run it with "
            "--method ct-w8a8"
        )
    )
    assert (
        methods.get("ct-w8a8")
        .checkpoint_problem(SHIPPED["ct-w4a16"])
        .endswith(
            "this one is compressed-tensors pack-quantized, int4 weights group 128, A16: run it with --method ct-w4a16"
        )
    )


def _bits3(cfg):
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3


def _gptq(cfg):
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}


def _frozen(cfg):
    cfg["quantization_config"]["quantization_status"] = "frozen"


@pytest.mark.parametrize(
    "edit, needle",
    [
        (_bits3, "int3 weights group 128, A16: no qbench method reads that scheme yet"),
        (_gptq, "has quant_method 'gptq': pass a checkpoint of that kind, or the method that reads this one"),
        (_frozen, "quantization_status is 'frozen', not 'compressed'"),
    ],
    ids=["3-bit", "gptq", "not-compressed"],
)
def test_a_checkpoint_of_another_format_is_refused_in_one_line(tmp_path, edit, needle):
    path = _copy(SHIPPED["ct-w4a16"], tmp_path / "ckpt", edit)
    why = methods.get("ct-w4a16").checkpoint_problem(path)
    assert needle in why and "\n" not in why


def test_the_run_refuses_before_loading_anything(tmp_path):
    """RunConfig.validate: a usage error (exit 2) naming model, method and the fix; a user's release with its
    full-precision reference passes."""
    cfg = RunConfig(models=[str(_copy(TINY, tmp_path / "plain"))], methods=["ct-w8a8"])
    with pytest.raises(UsageError, match=r"--method ct-w8a8: .* has no quantization_config"):
        cfg.validate()
    RunConfig(models=[str(SHIPPED["ct-w8a8"])], methods=["ct-w8a8"], reference_model="glm-tiny").validate()


def test_a_missing_library_names_the_ct_extra(monkeypatch):
    real = libraries.find_spec
    monkeypatch.setattr(libraries, "find_spec", lambda n: None if n == "compressed_tensors" else real(n))
    for name in NAMES:
        assert methods.get(name).unavailable("cpu") == "compressed-tensors is not installed: pip install 'qbench[ct]'"
    monkeypatch.setattr(libraries, "find_spec", lambda n: object())
    monkeypatch.setattr(libraries.importlib.metadata, "version", lambda dist: "0.19.0")
    assert methods.get("ct-w4a16").unavailable("cpu") == (
        "compressed-tensors 0.19.0 is installed; qbench needs compressed-tensors >= 0.20: pip install 'qbench[ct]'"
    )


# --- the loaded model -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_loading_yields_quantized_modules_that_stay_quantized(name):
    """Through qbench's loader (transformers with the checkpoint's own quantization_config): 24 linears hold the
    stored int tensors, lm_head is a plain bf16 linear, and after forward passes they still do: the footprint is the
    checkpoint's. Fails if ``prepare`` is skipped: compressed-tensors' hook decompresses every linear to a bf16
    weight on the first forward (planted once: all 24 decompressed, the footprint 2.6x (W4A16) and 1.7x (W8A8))."""
    _needs_library(name)
    m = methods.get(name)
    model = m.load(methods.LoadRequest(TINY, "cpu", "bf16"))
    quantized = m.quantized_modules(model)
    assert len(quantized) == 4 * 6 and m.left_unquantized(model) == []
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.bfloat16 and not ct.is_compressed(head)
    stored = "weight_packed" if name == "ct-w4a16" else "weight"
    for n in quantized:
        mod = model.get_submodule(n)
        assert getattr(mod, stored).dtype in (torch.int32, torch.int8), n
    before = weights_bytes(model)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8]]))
        model(torch.tensor([[9, 10]]))
    assert len(m.quantized_modules(model)) == 4 * 6 and weights_bytes(model) == before
    assert not hasattr(model, "ct_decompress_hook")
    from compressed_tensors.compressors import decompress_module

    decompress_module(model.get_submodule(quantized[5]))  # one linear back to a full-precision weight
    assert m.left_unquantized(model) == [quantized[5]]  # the integrity gate's "did not take effect" list


@pytest.mark.parametrize("name", NAMES)
def test_the_kept_compressed_forward_computes_what_compressed_tensors_decompressed_does(name):
    """qbench's per-call dequantization gives the logits of compressed-tensors' own path (decompress everything on the
    first forward), bit for bit: same decompressor, same activation quantization, same matmul."""
    _needs_library(name)
    m = methods.get(name)
    ours = m.load(methods.LoadRequest(TINY, "cpu", "bf16"))
    from qbench.models.loading import load_causal_lm

    theirs = load_causal_lm(SHIPPED[name], "cpu", torch.bfloat16)  # no prepare: the library's decompressing hook
    ids = torch.tensor([[5, 17, 300, 2, 44, 9, 801, 12]])
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert not any(ct.is_compressed(mod) for mod in theirs.modules())  # it did decompress
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_the_estimate_of_a_users_checkpoint_reads_its_quantization_config(name):
    """The estimate of the checkpoint itself (its quantization_config: group size, bits, symmetry, which linears) is
    the loaded footprint byte for byte, as the method's own scheme is for glm-tiny (tests/test_estimate.py)."""
    _needs_library(name)
    model = methods.get(name).load(methods.LoadRequest(SHIPPED[name], "cpu", "bf16"))
    assert est.weight_table(est.load_config(SHIPPED[name]), est.weight_format(name)).total == weights_bytes(model)


def test_layer_errors_skip_a_prequantized_checkpoints_int8_weights():
    """Per-layer errors compare with the checkpoint's full-precision weights; a W8A8 checkpoint's ``weight`` is int8,
    no such weight, and is left out (planted once without the check: 24 errors of ~1.0, the int8 values read as
    weights)."""
    _needs_library("ct-w8a8")
    from qbench.quality.layers import layer_errors

    m = methods.get("ct-w8a8")
    model = m.load(methods.LoadRequest(SHIPPED["ct-w8a8"], "cpu", "bf16"))
    ids = torch.tensor([[5, 17, 300, 2]])
    assert layer_errors(model, m.quantized_modules(model), SHIPPED["ct-w8a8"], ids) == {}
    errors = layer_errors(model, m.quantized_modules(model), TINY, ids)  # glm-tiny's own weights: all 24, small
    assert len(errors) == 24 and max(errors.values()) < 0.1


def test_the_estimate_refuses_a_checkpoint_of_the_other_scheme():
    with pytest.raises(UsageError, match="run it with --method ct-w8a8"):
        est.weight_table(est.load_config(SHIPPED["ct-w8a8"]), est.weight_format("ct-w4a16"))


def test_the_package_ships_the_checkpoints():
    """Every file of the shipped checkpoints matches pyproject's package-data for qbench.models (a wheel without them
    would refuse `--model glm-tiny --method ct-*` with "missing from the package")."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="tomllib (Python >= 3.11) reads pyproject.toml")
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"
    ]["qbench.models"]
    for folder in SHIPPED.values():
        for f in folder.iterdir():
            rel = f.relative_to(root / "qbench" / "models").as_posix()
            assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel
