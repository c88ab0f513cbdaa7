"""Each method carries its own size model (issue 22, item 2): the estimate asks the method's hooks
(:class:`qbench.methods.registry.Method`: ``weight_format``, ``linear_bytes``, ``weight_transient``, ...) and never
branches on a method's, family's or scheme's name, so a new method is one module, estimator included."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qbench.measure import estimate as est
from qbench.methods import registry
from qbench.methods.chatglm import ChatGLMInt8

ROOT = Path(__file__).resolve().parents[1] / "qbench"


class _Doubled(ChatGLMInt8):
    """chatglm-int8 under another name whose size model says each quantized linear takes twice the bytes."""

    name = "planted-int8-doubled"
    family = "planted"
    description = "chatglm-int8 with a planted size model: twice the bytes per quantized linear (test only)"

    def linear_bytes(self, fmt, out_features, in_features):
        data, side = super().linear_bytes(fmt, out_features, in_features)
        return 2 * data, 2 * side


@pytest.fixture
def planted(monkeypatch):
    # A copy of the registry for this test: the planted method goes with it, no other test sees it.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register(_Doubled)
    return _Doubled.name


def test_a_method_defined_outside_qbench_gets_its_own_bytes(planted):
    """The planted method is registered here, in the test, with no edit to qbench/measure or qbench/run; the
    estimate's weights are its hook's (twice chatglm-int8's quantized bytes), and so is the peak. Before issue 22
    item 2 the estimate refused it ("no size model for the planted family")."""
    base = est.estimate("glm-tiny", "chatglm-int8", max_memory=0)
    mine = est.estimate("glm-tiny", planted, max_memory=0)
    assert mine["method"] == planted and mine["quantized_linears"] == base["quantized_linears"] > 0
    for part in ("quantized", "quantization_side_data"):
        assert mine["weights"][part] == 2 * base["weights"][part] > 0
    assert mine["weights"]["full_precision_params"] == base["weights"]["full_precision_params"]
    extra = base["weights"]["quantized"] + base["weights"]["quantization_side_data"]
    assert mine["weights_bytes"] == base["weights_bytes"] + extra
    assert mine["runtime_peak_bytes"] == base["runtime_peak_bytes"] + extra
    assert mine["predicted_peak_bytes"] > base["predicted_peak_bytes"]


# A comparison of a format's scheme, a method's family or a method's name against a name: `scheme == "..."`,
# `scheme.startswith(...)`, `family in (...)`, `.name == "..."` (a module's dotted name, as run/measuring.py compares
# a module spec's, is no method's).
NAME_BRANCH = re.compile(
    r"""\b(scheme|family)\s*(==|!=)"""
    r"""|\b(scheme|family)\s+(not\s+)?in\s*[(\[{'"]"""
    r"""|\b(scheme|family)\.(startswith|endswith)\("""
    r"""|\.name\s*(==|!=)\s*['"](?!qbench\.)"""
)


def name_branches(root: Path) -> list[str]:
    return [
        f"{path.relative_to(root.parent)}:{i}: {line.strip()}"
        for part in ("measure", "run")
        for path in sorted((root / part).glob("*.py"))
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if NAME_BRANCH.search(line.split("#", 1)[0])
    ]


def test_measure_and_run_never_branch_on_a_method_family_or_scheme_name():
    """qbench/measure and qbench/run ask a method's size model instead of comparing its name, family or scheme.

    Before issue 22 item 2 this failed: qbench/measure/weights.py branched on ``m.family`` and ``fmt.scheme``
    (``weight_format``, ``quantized_linear_bytes``, ``_quantized_linears``), runtime.py, load_phase.py and
    estimate.py on ``fmt.scheme``, prequantized.py on its layout's scheme (46 lines in all, checked on a copy of that
    tree)."""
    assert name_branches(ROOT) == []


def test_a_quantizing_method_without_a_size_model_is_one_line_naming_the_fix(monkeypatch):
    """A new quantizing method that does not say how it stores weights is refused with the hook to write, not sized
    as if it were unquantized (which would make every estimate of it fit)."""
    from qbench.errors import UsageError
    from qbench.methods.reference import BF16

    class NoSizeModel(BF16):
        name = "planted-no-size-model"
        family = "planted"
        quantized = True
        description = "a quantizing method with no size model (test only)"

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register(NoSizeModel)
    with pytest.raises(UsageError) as e:
        est.estimate("glm-tiny", NoSizeModel.name)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--method planted-no-size-model: ")
    assert "no size model for the planted family" in message and "weight_format" in message
