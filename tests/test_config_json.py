"""RunConfig and Workload have one way to JSON and back (what a case process gets), and the results file's
"config" (config_doc) is unchanged by it."""

import json
from pathlib import Path

from qbench.models.zoo import EVAL_TEXT, PROMPTS
from qbench.run.config import RunConfig, config_doc
from qbench.run.workload import Workload
from qbench.serve.settings import EndpointConfig


def _unusual_config(tmp_path: Path) -> RunConfig:
    """A config with no setting at its default: every field's conversion is exercised."""
    workload = Workload(
        eval_text=tmp_path / "eval.txt",
        prompts=tmp_path / "prompts.json",
        window=64,
        max_positions=256,
        top_k=16,
        greedy_tokens=4,
        contexts=(32, 64),
        batches=(1, 2, 4),
        new_tokens=8,
        repeat=2,
        warmup=0,
    )
    return RunConfig(
        models=["glm-tiny", "chatglm-tiny"],
        methods=["fp32", "bnb-nf4"],
        device="cuda:1",
        compute_dtype="fp16",
        reference="fp32",
        workload=workload,
        baselines=tmp_path / "baselines",
        update_baselines=True,
        force=True,
        lenient=True,
        reference_source="stored",
        isolate=True,
        case_timeout_s=12.5,
        threads=3,
        case_memory_limit=2**30,
        reference_model="glm-tiny",
        device_map=str(tmp_path / "map.json"),
        max_memory="0=20GiB,cpu=64GiB",
        reference_cache=tmp_path / "cache",
        reuse_reference=True,
        method_notes=["--method all: left out hqq-4bit (hqq is not installed)"],
        endpoint=EndpointConfig(
            url="http://127.0.0.1:8000",
            served_model="glm",
            expect="4bit",
            concurrency=(1, 8),
            requests=8,
            request_timeout_s=5.0,
            retries=0,
            served_device="cuda-sm90",
            logprobs=4,
            speed_only=True,
            engine_drift="fp32",
            engine="vllm/0.9",
        ),
    )


def test_round_trip_of_a_config_with_no_default(tmp_path):
    cfg = _unusual_config(tmp_path)
    doc = cfg.to_json()
    assert json.loads(json.dumps(doc)) == doc  # JSON values only: paths as strings, tuples as lists
    assert doc["baselines"] == str(tmp_path / "baselines") and doc["workload"]["batches"] == [1, 2, 4]
    back = RunConfig.from_json(json.loads(json.dumps(doc)))
    assert back == cfg
    assert isinstance(back.baselines, Path) and isinstance(back.reference_cache, Path)
    assert isinstance(back.workload.eval_text, Path) and back.workload.contexts == (32, 64)
    assert back.endpoint.concurrency == (1, 8) and doc["endpoint"]["concurrency"] == [1, 8]
    doc["models"].append("another")  # the document owns its lists
    assert cfg.models == ["glm-tiny", "chatglm-tiny"]


def test_round_trip_of_the_default_config():
    cfg = RunConfig()
    assert RunConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert cfg.to_json()["reference_cache"] is None  # an absent path stays None, not "None"
    assert Workload.from_json(Workload().to_json()) == Workload()


def test_config_doc_is_unchanged():
    # config_doc(RunConfig()) as it was before RunConfig had to_json, key order and tuples included: it is what the
    # results file's "config" holds, and `--json`/`--resume` compare a rerun's settings with it.
    expected = {
        "models": ["glm-tiny"],
        "methods": ["bf16", "bnb-nf4", "bnb-int8"],
        "device": "cpu",
        "reference": "bf16",
        "reference_source": "compute",
        "compute_dtype": None,
        "isolate": False,
        "reference_model": None,
        "device_map": None,
        "max_memory": None,
        "threads": None,
        "workload": {
            "eval_text": str(EVAL_TEXT),
            "prompts": str(PROMPTS),
            "window": 128,
            "max_positions": 4096,
            "top_k": 32,
            "greedy_tokens": 24,
            "contexts": (128,),
            "batches": (1,),
            "new_tokens": 32,
            "repeat": 5,
            "warmup": 1,
            "noise_floor": True,  # added with the noise floor (issue 24); files without it still compare
        },
    }
    doc = config_doc(RunConfig())
    assert doc == expected
    assert list(doc) == list(expected) and list(doc["workload"]) == list(expected["workload"])
    assert json.dumps(doc) == json.dumps(expected)


def test_config_doc_of_a_config_with_no_default(tmp_path):
    cfg = _unusual_config(tmp_path)
    doc = config_doc(cfg)
    assert doc["device_map"] == str(tmp_path / "map.json") and doc["threads"] == 3 and doc["isolate"] is True
    assert doc["workload"]["eval_text"] == str(tmp_path / "eval.txt") and doc["workload"]["contexts"] == (32, 64)
    assert "baselines" not in doc and "case_timeout_s" not in doc  # only the settings the file has always recorded
