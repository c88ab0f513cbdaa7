"""The recipe of glm4-moe-tiny: a GLM-4.5-layout mixture of experts trained by :func:`qbench.models.train.train`.

GLM-4.5's layout, small: a dense first layer (``first_k_dense_replace``), then MoE layers of routed experts chosen
by a sigmoid router (top-k, ``norm_topk_prob``) plus a shared expert, partial RoPE, untied head, and one MTP
("nextn") layer stored as ``model.layers.{num_hidden_layers}.*`` the way GLM-4.5's checkpoints store it.

Two things the dense loop does not do:

* **Aux-loss-free load balancing** (DeepSeek-V3, arXiv 2412.19437, section 2.1.2, which GLM-4.5 follows): the router's
  ``e_score_correction_bias`` enters only the top-k choice and gets no gradient; after each step every MoE layer's
  bias moves by ``bias_update`` towards the experts that got fewer tokens than the mean: ``b_e += u * sign(mean -
  load_e)``. Early in the shipped run, before the biases had moved far, the least-used expert got 0.000-0.016
  of a step's choices; at the end 0.118 over the held-out text (uniform: 0.125).
* **Multi-token prediction** (DeepSeek-V3 section 2.2): the MTP layer combines the main model's last hidden state
  ``h_i`` with the embedding of token ``i+1``, ``eh_proj([enorm(emb(t_{i+1})), hnorm(h_i)])``, runs one MoE decoder
  layer and predicts token ``i+2`` through the shared lm_head after its own norm (``shared_head.norm``). Its loss,
  weighted by ``mtp_weight``, is added to the main loss. The module is transformers' own ``MtpModel`` (what
  ``generate(use_mtp=True)`` runs), so the trained weights mean what transformers and GLM-4.5 mean by them.

transformers does not load the MTP layer into ``Glm4MoeForCausalLM``: it drops GLM-4.5's (layer 92) and
GLM-4.5-Air's (layer 46) silently by name, and reports this model's ``model.layers.4.*`` as unexpected keys. For the
same reason ``MtpModel.from_pretrained`` (``generate(use_mtp=True)``) would not find it: it looks for the MTP weights
with those two layer numbers (``MtpModel.get_mtp_weights_regex``, transformers 5.25).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qbench.models.train import Recipe, TrainConfig, decoder_dims

# transformers keeps these in float32 whatever the load dtype (Glm4MoePreTrainedModel._keep_in_fp32_modules_strict);
# the checkpoint stores them in float32 too, everything else in bfloat16 as GLM-4.5's checkpoints are.
FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


@dataclass(frozen=True)
class MoeTrainConfig(TrainConfig):
    """glm-tiny's recipe fields, with defaults that make glm4-moe-tiny (its tokenizer is glm-tiny's, shipped)."""

    # glm-tiny's 1500 steps: measured 0.83 s a step at one thread (batch 24 x 128, MTP included), 1260 s in all.
    steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    # hidden 128, heads 4 x 32, kv 2, dense MLP 256, experts 128 wide: the former random glm4-moe-tiny's widths, all
    # multiples of 64 (bnb's block) and of 128 (the group size of the int4 methods).
    hidden_size: int = field(default=128, metadata={"help": "model width"})
    intermediate_size: int = field(default=256, metadata={"help": "MLP width of the dense first layer"})
    layers: int = field(default=4, metadata={"help": "decoder layers (the first dense, the others MoE)"})
    heads: int = field(default=4, metadata={"help": "attention heads (head_dim 32)"})
    kv_heads: int = field(default=2, metadata={"help": "key/value heads"})
    threads: int = field(default=1, metadata={"help": "torch threads (one core: the shipped model's budget)"})
    experts: int = field(default=8, metadata={"help": "routed experts per MoE layer"})
    expert_size: int = field(default=128, metadata={"help": "moe_intermediate_size"})
    top_k: int = field(default=2, metadata={"help": "experts per token (num_experts_per_tok)"})
    shared_experts: int = field(default=1, metadata={"help": "n_shared_experts"})
    # DeepSeek-V3 (section 4.2): bias update speed 0.001; MTP loss weight 0.3 for most of its training.
    bias_update: float = field(default=1e-3, metadata={"help": "router bias step per optimizer step"})
    mtp_weight: float = field(default=0.3, metadata={"help": "weight of the MTP (next-next-token) loss"})


def model_config(cfg: MoeTrainConfig, tokenizer):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        **decoder_dims(cfg, tokenizer),
        moe_intermediate_size=cfg.expert_size,
        n_routed_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k,
        n_shared_experts=cfg.shared_experts,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        num_nextn_predict_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )


def routers(model, mtp=None) -> dict:
    """Every MoE layer's router by the checkpoint name of its MLP: ``model.layers.{i}.mlp`` (the MTP layer's as
    ``model.layers.{num_hidden_layers}.mlp``)."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    found = {name.removesuffix(".gate"): m for name, m in model.named_modules() if isinstance(m, Glm4MoeTopkRouter)}
    if mtp is not None:
        found[f"model.layers.{model.config.num_hidden_layers}.mlp"] = mtp.layers[0].mtp_block.mlp.gate
    return found


class ExpertLoad:
    """Counts, per router, how many top-k choices went to each expert while it is attached (forward hooks)."""

    def __init__(self, gates: dict):
        import torch

        self.counts = {name: torch.zeros(g.num_experts, dtype=torch.long) for name, g in gates.items()}
        self._hooks = [g.register_forward_hook(self._hook(name)) for name, g in gates.items()]

    def _hook(self, name: str):
        def count(module, args, output):  # output: (router_logits, topk_weights, topk_indices)
            self.counts[name] += output[2].detach().flatten().bincount(minlength=module.num_experts)

        return count

    def reset(self) -> None:
        for c in self.counts.values():
            c.zero_()

    def shares(self) -> dict[str, list[float]]:
        return {name: (c / c.sum().clamp(min=1)).tolist() for name, c in self.counts.items()}

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _init_mtp(mtp, std: float) -> None:
    """Initialise the MTP layer as Glm4MoePreTrainedModel._init_weights does the main layers (normal(0, std) for
    every matrix, ones for the norms, a zero router bias): ``MtpModel``'s generic init leaves the fused experts and
    the router at zero. Draws from the global torch generator, seeded by the loop."""
    import torch

    with torch.no_grad():
        for name, p in mtp.layers.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for b in mtp.layers.buffers():  # e_score_correction_bias
            b.zero_()


class MoeRecipe(Recipe):
    name = "glm4-moe-tiny"

    def tokenizer(self, cfg, train_text: str):
        """glm-tiny's shipped tokenizer (vocabulary 1024), so both models read the same prompts and held-out text."""
        from transformers import AutoTokenizer

        from qbench.models.zoo import GLM_TINY_DIR

        return AutoTokenizer.from_pretrained(GLM_TINY_DIR)

    def build(self, cfg: MoeTrainConfig, tokenizer):
        from transformers import Glm4MoeForCausalLM
        from transformers.modeling_layers import MtpModel

        self.cfg = cfg
        model = Glm4MoeForCausalLM(model_config(cfg, tokenizer))
        # MtpModel shares embed_tokens, lm_head and rotary_emb with `model`; its own part is `layers`.
        self.mtp = MtpModel(model, 1)
        _init_mtp(self.mtp, model.config.initializer_range)
        self.load = ExpertLoad(routers(model, self.mtp))
        return model

    def parameters(self, model) -> list:
        return list(model.parameters()) + list(self.mtp.layers.parameters())

    def loss(self, model, batch):
        import torch

        ce = torch.nn.functional.cross_entropy
        inputs = batch[:, :-1]
        hidden = model.model(inputs).last_hidden_state  # after the final norm: what generate() gives MtpModel
        logits = model.lm_head(hidden)
        main = ce(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        if self.cfg.mtp_weight == 0:
            return main, main
        # Position i: h_i with the embedding of token i+1 (at position i+1) predicts token i+2.
        positions = torch.arange(1, inputs.shape[1], device=batch.device)[None]
        h = self.mtp.forward_layer(0, hidden[:, :-1], positions, None, input_ids=inputs[:, 1:])
        mtp_logits = self.mtp.shared_head(h)
        mtp = ce(mtp_logits.reshape(-1, mtp_logits.shape[-1]), batch[:, 2:].reshape(-1))
        self.last_mtp_loss = mtp.detach()
        return main + self.cfg.mtp_weight * mtp, main

    def after_step(self, model) -> None:
        """DeepSeek-V3's bias update from this step's loads (the counts the hooks took during its forward)."""
        gates = routers(model, self.mtp)
        for name, counts in self.load.counts.items():
            load = counts.float()
            gates[name].e_score_correction_bias += self.cfg.bias_update * (load.mean() - load).sign()
        shares = [s for layer in self.load.shares().values() for s in layer]
        self.spread = f"expert share {min(shares):.3f}..{max(shares):.3f}"
        self.load.reset()

    def status(self) -> str:
        return getattr(self, "spread", "")

    def finish(self, model) -> None:
        """Round every weight to bfloat16 (the router's stay float32), as saved: the held-out ppl and the expert
        load are then those of the shipped checkpoint."""
        import torch

        self.load.remove()
        with torch.no_grad():
            for module in (model, self.mtp.layers):
                for name, t in [*module.named_parameters(), *module.named_buffers()]:
                    if t.is_floating_point() and not name.endswith(FP32_SUFFIXES) and "rotary_emb" not in name:
                        t.copy_(t.to(torch.bfloat16))

    def save(self, model, tokenizer, out: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        model.save_pretrained(out)  # writes GLM-4.5's per-expert names (experts.{e}.gate_proj.weight, ...)
        tokenizer.save_pretrained(out)
        path = out / "model.safetensors"
        tensors = {**load_file(path), **mtp_tensors(self.mtp, model.config.num_hidden_layers)}
        tensors = {k: v if k.endswith(FP32_SUFFIXES) else v.to(torch.bfloat16) for k, v in tensors.items()}
        save_file(dict(sorted(tensors.items())), path, metadata={"format": "pt"})
        shutil.copymode(out / "config.json", path)  # save_file leaves it readable by its owner only
        # save_pretrained wrote the in-memory dtype (float32); the checkpoint's is bfloat16 (GLM-4.5's "dtype" too).
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
        (out / "config.json").write_text(
            json.dumps({**config, "dtype": "bfloat16"}, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    def record(self, model, eval_ids, cfg) -> dict:
        import torch

        mtp_params = sum(p.numel() for p in self.mtp.layers.parameters())
        loads = expert_load(model, eval_ids, cfg.seq_len, self.mtp)
        all_shares = [s for shares in loads.values() for s in shares]
        return {
            "mtp": {
                "layer": f"model.layers.{model.config.num_hidden_layers}",
                "parameters": mtp_params,
                "trained": cfg.mtp_weight > 0,
                "loss_weight": cfg.mtp_weight,
                "final_train_loss": round(float(getattr(self, "last_mtp_loss", torch.nan)), 4),
                "heldout_ppl_next_next_token": round(mtp_ppl(model, self.mtp, eval_ids, cfg.seq_len), 4),
                "not_stored": "embed_tokens and shared_head.head: shared with the main model (GLM-4.6 omits them too)",
            },
            "expert_load": {
                "what": "share of the top-k choices each routed expert got over the held-out text (eval.txt), "
                "per MoE layer, after training; uniform is 1/experts",
                "uniform_share": round(1 / cfg.experts, 4),
                "min_share": round(min(all_shares), 4),
                "max_share": round(max(all_shares), 4),
                "layers": {name: [round(s, 4) for s in shares] for name, shares in loads.items()},
            },
        }


def mtp_tensors(mtp, num_hidden_layers: int) -> dict:
    """MtpModel's own weights under GLM-4.5's checkpoint names: ``model.layers.{L}.`` + the decoder layer's names
    (experts one by one, as save_pretrained writes the main layers), ``eh_proj``, ``enorm``, ``hnorm`` and
    ``shared_head.norm`` (what transformers' conversion mapping renames to MtpLayer.post_norm)."""
    prefix = f"model.layers.{num_hidden_layers}."
    out = {}
    for name, t in mtp.layers[0].state_dict().items():
        t = t.detach().clone().contiguous()
        if name == "post_norm.weight":
            out[prefix + "shared_head.norm.weight"] = t
        elif name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: gate rows first (Glm4MoeExperts.forward)
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = t[e].clone()
        else:
            out[prefix + name.removeprefix("mtp_block.")] = t
    return out


def expert_load(model, ids, seq_len: int, mtp=None) -> dict[str, list[float]]:
    """Share of the top-k choices per routed expert per MoE layer over ``ids``, read in chunks of ``seq_len`` as
    :func:`qbench.models.train.heldout_ppl` reads it; with ``mtp``, its layer too (fed as in training)."""
    import torch

    load = ExpertLoad(routers(model, mtp))
    try:
        with torch.no_grad():
            for start in range(0, ids.numel() - 1, seq_len):
                chunk = ids[start : start + seq_len + 1]
                if chunk.numel() < 2:
                    break
                hidden = model.model(chunk[None, :-1]).last_hidden_state
                if mtp is not None and chunk.numel() > 2:
                    positions = torch.arange(1, chunk.numel() - 1)[None]
                    mtp.forward_layer(0, hidden[:, :-1], positions, None, input_ids=chunk[None, 1:-1])
        return load.shares()
    finally:
        load.remove()


def mtp_ppl(model, mtp, ids, seq_len: int) -> float:
    """Perplexity of the MTP layer's next-next-token predictions over ``ids`` (chunks as heldout_ppl's)."""
    import math

    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 2, seq_len):
            chunk = ids[start : start + seq_len + 1]
            if chunk.numel() < 3:
                break
            hidden = model.model(chunk[None, :-1]).last_hidden_state
            positions = torch.arange(1, chunk.numel() - 1)[None]
            h = mtp.forward_layer(0, hidden[:, :-1], positions, None, input_ids=chunk[None, 1:-1])
            logits = mtp.shared_head(h)[0].float()
            nll += torch.nn.functional.cross_entropy(logits, chunk[2:], reduction="sum").item()
            n += chunk.numel() - 2
    return math.exp(nll / n)
