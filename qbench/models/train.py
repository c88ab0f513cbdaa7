"""Train glm-tiny from nothing on the CPU: corpus from a seed, a byte-level BPE tokenizer, a GlmForCausalLM.

``qbench zoo train glm-tiny --out DIR`` runs this (and ``qbench zoo train glm4-moe-tiny``, the same loop with the
recipe of :mod:`qbench.models.train_moe`); the shipped checkpoint was made by the command recorded in
its ``TRAINING.json``. Everything is deterministic in the seed up to the float summation order of the CPU
kernels, so a retrain on another machine gives a model of the same quality, not the same bytes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qbench.models import corpus


@dataclass(frozen=True)
class TrainConfig:
    seed: int = field(default=0, metadata={"help": "seed of the corpus, the initialisation and the batches"})
    steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    batch: int = field(default=24, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per training sequence"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW), cosine decay to 10%"})
    warmup: int = field(default=40, metadata={"help": "linear warm-up steps"})
    train_lines: int = field(default=60_000, metadata={"help": "corpus lines to train on"})
    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size"})
    hidden_size: int = field(default=256, metadata={"help": "model width (multiple of 64: bnb blocksize)"})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width (multiple of 64)"})
    layers: int = field(default=4, metadata={"help": "decoder layers"})
    heads: int = field(default=4, metadata={"help": "attention heads (head_dim 64)"})
    kv_heads: int = field(default=2, metadata={"help": "key/value heads (grouped-query attention)"})
    threads: int = field(default=2, metadata={"help": "torch threads"})


# Seeds of the shipped held-out material: disjoint from any training seed a user is likely to pick.
EVAL_SEED = 10_001
PROMPT_SEED = 20_002
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>"]


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE (digits split one by one) trained on ``text``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", model_max_length=512
    )


def decoder_dims(cfg: TrainConfig, tokenizer) -> dict:
    """The config settings a trained tiny GLM has whatever its MLP: widths, heads, positions, norms, special tokens."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden_size // cfg.heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def model_config(cfg: TrainConfig, tokenizer):
    from transformers import GlmConfig

    return GlmConfig(**decoder_dims(cfg, tokenizer))


def write_eval_material(data_dir: Path) -> None:
    """The held-out evaluation text and the fixed prompt set that ship with the package."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "eval.txt").write_text(corpus.text(EVAL_SEED, 700), encoding="utf-8")
    prompts = {
        "text": [
            "the small cat",
            "some happy children",
            "a robot carries",
            "every farmer",
            "these old dogs",
            "one bird watches",
            "今天小狗",
            "我们在学校",
            "昨天老师",
            "孩子在河边",
            "机器人买了",
            "12+",
            "58+3",
        ],
        "addition": [{"prompt": p, "answer": a} for p, a in corpus.addition_prompts(PROMPT_SEED, 50)],
    }
    (data_dir / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False, indent=1) + "\n", "utf-8")


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def heldout_ppl(model, ids, seq_len: int) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, seq_len):
            chunk = ids[start : start + seq_len + 1]
            if chunk.numel() < 2:
                break
            logits = model(chunk[None, :-1]).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            n += chunk.numel() - 1
    return math.exp(nll / n)


class Recipe:
    """What makes one trained zoo model differ from another; the loop in :func:`train` is shared.

    This one is glm-tiny's: its own tokenizer, a dense GlmForCausalLM, next-token loss only. Subclasses (for
    instance :class:`qbench.models.train_moe.MoeRecipe`) override the hooks they need."""

    name = "glm-tiny"

    def tokenizer(self, cfg: TrainConfig, train_text: str):
        return train_tokenizer(train_text, cfg.vocab_size)

    def build(self, cfg: TrainConfig, tokenizer):
        """The model, initialised from the global torch seed."""
        from transformers import GlmForCausalLM

        return GlmForCausalLM(model_config(cfg, tokenizer))

    def parameters(self, model) -> list:
        """Everything the optimizer trains (subclasses add modules that are not part of ``model``)."""
        return list(model.parameters())

    def loss(self, model, batch) -> tuple:
        """(loss to minimise, next-token loss) for ``batch`` [B, seq_len + 1]."""
        import torch

        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        return loss, loss

    def after_step(self, model) -> None:
        """Updates that are not the optimizer's, run after each step under ``torch.no_grad()``."""

    def status(self) -> str:
        """Appended to the progress line."""
        return ""

    def finish(self, model) -> None:
        """Make ``model`` hold the numbers that will be saved (the held-out figures are measured after this)."""

    def save(self, model, tokenizer, out: Path) -> None:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    def record(self, model, eval_ids, cfg: TrainConfig) -> dict:
        """Entries the training record gets beside the common ones."""
        return {}


def train(out: Path, cfg: TrainConfig, log: Callable[[str], None] = print, how: Recipe | None = None) -> dict:
    """Train a zoo model (glm-tiny unless ``how`` says otherwise) into ``out`` (an ordinary HF checkpoint
    directory) and return the training record, also written to ``out/TRAINING.json``."""
    import torch

    how = how or Recipe()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train_text = corpus.text(cfg.seed, cfg.train_lines)
    tokenizer = how.tokenizer(cfg, train_text)
    ids = torch.tensor(tokenizer(train_text, verbose=False)["input_ids"], dtype=torch.long)
    eval_ids = torch.tensor(tokenizer(corpus.text(EVAL_SEED, 700), verbose=False)["input_ids"], dtype=torch.long)
    log(f"corpus: {cfg.train_lines} lines, {ids.numel()} tokens; vocabulary {len(tokenizer)}")

    model = how.build(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    params = how.parameters(model)
    log(f"model: {n_params / 1e6:.2f} M parameters ({sum(p.numel() for p in params) / 1e6:.2f} M trained)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    loss_val = float("nan")
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        starts = torch.randint(0, ids.numel() - cfg.seq_len - 1, (cfg.batch,), generator=gen)
        batch = torch.stack([ids[s : s + cfg.seq_len + 1] for s in starts.tolist()])
        loss, next_token_loss = how.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            how.after_step(model)
        loss_val = next_token_loss.item()
        if step % 50 == 0 or step == cfg.steps - 1:
            t = time.perf_counter() - t0
            log(f"step {step:5d}  loss {loss_val:.3f}  lr {_lr(step, cfg):.2e}  {t:.0f}s  {how.status()}".rstrip())
    model.eval()
    how.finish(model)
    ppl = heldout_ppl(model, eval_ids, cfg.seq_len)
    out.mkdir(parents=True, exist_ok=True)
    how.save(model, tokenizer, out)
    record = {
        "command": f"qbench zoo train {how.name} --out {out.name} --seed {cfg.seed} --steps {cfg.steps}",
        "config": asdict(cfg),
        "parameters": n_params,
        "final_train_loss": round(loss_val, 4),
        "heldout_ppl": round(ppl, 4),
        "uniform_ppl": len(tokenizer),
        **how.record(model, eval_ids, cfg),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    (out / "TRAINING.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    log(f"held-out ppl {ppl:.3f} (uniform over the vocabulary: {len(tokenizer)})")
    return record
