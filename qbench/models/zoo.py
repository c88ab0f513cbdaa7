"""Where weights come from: the zoo of tiny GLMs, local checkpoint directories, hub ids already cached.

``resolve(spec)`` turns what a user typed after ``--model`` into a checkpoint directory, or raises
:class:`~qbench.errors.UsageError` with one line that names the problem and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qbench.errors import UsageError

DATA_DIR = Path(__file__).parent / "data"
GLM_TINY_DIR = DATA_DIR / "glm-tiny"
EVAL_TEXT = DATA_DIR / "eval.txt"
PROMPTS = DATA_DIR / "prompts.json"

# model_type values qbench loads with transformers' own classes (no remote code).
SUPPORTED_MODEL_TYPES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
# ChatGLM3's own format (model_type "chatglm") is read too, as GlmForCausalLM: see qbench.models.chatglm_checkpoint.


@dataclass(frozen=True)
class ZooEntry:
    name: str
    architecture: str
    description: str
    build: Callable[[], Path]
    # The transformers config of a model built on demand (None for a shipped one: its directory holds it). Tests
    # that build a variant of a zoo model start from it instead of a copy written out by hand.
    config: Callable[[], object] | None = None


ZOO: dict[str, ZooEntry] = {}


def _add(entry: ZooEntry) -> None:
    if entry.name in ZOO:
        raise ValueError(f"zoo entry {entry.name!r} registered twice")
    ZOO[entry.name] = entry


def cache_dir() -> Path:
    """Where on-demand zoo models are built: $QBENCH_CACHE, else ~/.cache/qbench."""
    return Path(os.environ.get("QBENCH_CACHE", Path.home() / ".cache" / "qbench"))


def _shipped(name: str, architecture: str, description: str) -> None:
    """Register a trained zoo model that ships in the package, in ``DATA_DIR / name`` (made by ``qbench zoo train
    NAME``, as its TRAINING.json records)."""
    directory = DATA_DIR / name

    def build() -> Path:
        if not (directory / "model.safetensors").is_file():
            raise UsageError(
                f"{name} is missing from the package ({directory}); reinstall qbench or rebuild it with "
                f"`qbench zoo train {name} --out <dir>`"
            )
        return directory

    _add(ZooEntry(name, architecture, description, build))


_shipped("glm-tiny", "GlmForCausalLM", "trained on qbench's synthetic bilingual corpus; ships in the package")
_shipped(
    "glm4-moe-tiny",
    "Glm4MoeForCausalLM",
    "GLM-4.5 layout (8 experts, top-2, shared expert, MTP layer) trained on glm-tiny's corpus; ships in the package",
)


# Written last into a zoo build: every file's size in bytes. A directory without it, or whose files differ from it
# (a build killed half-way by an older qbench, a truncated copy), is not used: it is rebuilt.
BUILD_MARKER = "qbench-build.json"


def _built(out: Path) -> bool:
    try:
        files = json.loads((out / BUILD_MARKER).read_text(encoding="utf-8"))["files"]
        return bool(files) and all((out / f).stat().st_size == n for f, n in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _random_init(name: str, config) -> Path:
    """Build a random-weight model from ``config`` with seed 0 once, reusing glm-tiny's tokenizer.

    Several processes may build the same model at once (pytest-xdist workers, parallel CI jobs sharing a cache):
    each builds in its own temporary directory beside the target and renames it into place, which is atomic; the
    first rename wins and the others discard theirs. A reader uses a directory only once its marker vouches for
    every file."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "zoo" / f"{name}-v1"
    if _built(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(GLM_TINY_DIR).save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / BUILD_MARKER).write_text(json.dumps({"name": name, "files": files}, indent=1), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache is for everyone to read
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when ours was renamed into place
    if not _built(out):
        raise UsageError(f"zoo model {name}: {out} is incomplete after building it; remove it and run again")
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    try:
        os.rename(tmp, out)  # atomic; replaces only a missing or empty directory
        return
    except OSError:
        if _built(out):  # another process built it meanwhile: keep theirs, ours is discarded
            return
    # A stale, incomplete directory is in the way: move it aside (atomically) and try once more.
    stale = out.with_name(f".{out.name}.stale-{os.getpid()}")
    with contextlib.suppress(OSError):  # gone already: another process moved it
        os.rename(out, stale)
    try:
        os.rename(tmp, out)
    except OSError:
        if not _built(out):
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def _tiny_dims() -> dict:
    tok = json.loads((GLM_TINY_DIR / "config.json").read_text())
    return dict(
        vocab_size=tok["vocab_size"],
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        pad_token_id=tok["pad_token_id"],
        eos_token_id=tok["eos_token_id"],
        bos_token_id=tok["bos_token_id"],
        tie_word_embeddings=False,
    )


def _glm4_tiny_config():
    from transformers import Glm4Config

    return Glm4Config(intermediate_size=256, **_tiny_dims())


def _on_demand(name: str, architecture: str, description: str, config: Callable[[], object]) -> None:
    """Register a zoo model built from ``config`` with random weights (seed 0) the first time it is asked for."""
    _add(ZooEntry(name, architecture, description, lambda: _random_init(name, config()), config))


_on_demand(
    "glm4-tiny",
    "Glm4ForCausalLM",
    "random weights from a small GLM-4-0414 config, seed 0, built on demand",
    _glm4_tiny_config,
)


def resolve(spec: str) -> Path:
    """A zoo id, a checkpoint directory, or a hub id already in the local cache → checkpoint directory."""
    if spec in ZOO:
        return ZOO[spec].build()
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_checkpoint_dir(path)
    if path.exists():
        raise UsageError(
            f"--model {spec}: is a file, not a checkpoint directory; pass the directory holding config.json"
        )
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return check_checkpoint_dir(Path(snapshot_download(spec, local_files_only=True)))
        except UsageError:
            raise
        except Exception:
            pass
    raise UsageError(
        f"--model {spec}: no such directory, not a zoo id ({', '.join(ZOO)}) and not a hub id in the local "
        "cache; pass a checkpoint directory, or download the model first on a machine with network access"
    )


def check_checkpoint_dir(path: Path) -> Path:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"--model {path}: no config.json there; pass a Hugging Face checkpoint directory")
    try:
        model_type = json.loads(cfg_path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--model {path}: config.json is not valid JSON ({e}); fix or re-download it") from None
    if model_type == "chatglm":  # ChatGLM3's own format: read without remote code (qbench.models.chatglm_checkpoint)
        from qbench.models.chatglm_checkpoint import ChatGLMCheckpoint, PickleOnly

        try:
            ChatGLMCheckpoint(path)
        except PickleOnly:
            raise UsageError(
                f"--model {path}: only pickle weights (pytorch_model*.bin), and qbench runs safetensors only (pickle "
                f"can run code); if you trust them, re-save once: `qbench convert {path} DST --allow-pickle "
                "--keep-chatglm-format`, then --model DST"
            ) from None
        except UsageError as e:
            raise UsageError(f"--model {path}: {e}") from None
        return path
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(
            f"--model {path}: model_type {model_type!r} is not supported; qbench runs "
            f"{', '.join(f'{k} ({v})' for k, v in SUPPORTED_MODEL_TYPES.items())}"
        )
    if not any(path.glob("*.safetensors")):
        pickled = "only pickle weights (pytorch_model*.bin)" if any(path.glob("*.bin")) else "no weights"
        raise UsageError(
            f"--model {path}: {pickled}; qbench loads safetensors only (pickle can run code): re-save the model "
            "with save_pretrained(DIR, safe_serialization=True) where you trust it"
        )
    return path


def model_id(spec: str) -> str:
    """The short name a case is keyed by: the zoo id, else the directory's name."""
    return spec if spec in ZOO else Path(spec.rstrip("/")).name or spec
