"""Routing drift (issue 23 item 4): the statistics against a hand-computed case, the recorder on a real glm4_moe model
(sets per token and MoE layer, nothing for a dense model), and a planted router fault moving only what it touches."""

from __future__ import annotations

import pytest
import torch

from qbench.quality.routing import record_routing, routers, routing_drift


def test_statistics_by_hand():
    # one MoE layer, two tokens, top-2: token 0 keeps {0, 1}, token 1 goes from {2, 3} to {2, 4}
    ref = torch.tensor([[[0, 1], [2, 3]]], dtype=torch.int16)
    got = torch.tensor([[[0, 1], [2, 4]]], dtype=torch.int16)
    d = routing_drift(ref, got, [1])
    assert d["routing_changed"] == 0.5  # 1 of 2 (token, layer) pairs
    assert d["routing_overlap"] == 0.75  # (2/2 + 1/2) / 2
    assert d["routing_layers"] == {"1": {"changed": 0.5, "overlap": 0.75}}
    assert routing_drift(ref, ref)["routing_changed"] == 0.0 and routing_drift(ref, ref)["routing_overlap"] == 1.0


def test_two_layers_are_reported_apart():
    ref = torch.tensor([[[0, 1], [0, 1]], [[2, 3], [2, 3]]], dtype=torch.int16)
    got = torch.tensor([[[0, 1], [0, 1]], [[4, 5], [2, 3]]], dtype=torch.int16)
    d = routing_drift(ref, got, [1, 2])
    assert d["routing_layers"]["1"] == {"changed": 0.0, "overlap": 1.0}
    assert d["routing_layers"]["2"] == {"changed": 0.5, "overlap": 0.5}
    assert d["routing_changed"] == 0.25


def test_runs_that_routed_other_tokens_do_not_compare():
    with pytest.raises(ValueError, match="did not route the same tokens"):
        routing_drift(torch.zeros(1, 4, 2, dtype=torch.int16), torch.zeros(1, 5, 2, dtype=torch.int16))


def _moe(seed: int = 0):
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(seed)
    config = Glm4MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        pad_token_id=0,
    )
    model = Glm4MoeForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises the router weight to zeros: give it something to route by
        for gate in routers(model).values():
            gate.weight.normal_(0, 0.5)
    return model


def _route(model, windows):
    with record_routing(model) as rec, torch.inference_mode():
        for w in windows:
            model(input_ids=w[None])
    return rec


def test_the_recorder_keeps_each_token_s_expert_set_per_moe_layer():
    model = _moe()
    windows = [torch.arange(10) % 64, torch.arange(7) + 20]
    rec = _route(model, windows)
    assert rec.layers == [1, 2]  # layer 0 is dense (first_k_dense_replace=1)
    routed = rec.result()
    assert routed.shape == (2, 17, 2) and routed.dtype == torch.int16
    assert bool((routed[..., 0] < routed[..., 1]).all())  # sorted, distinct: a set
    assert not any(h for g in routers(model).values() for h in g._forward_hooks.values())  # hooks removed
    again = _route(model, windows).result()
    assert torch.equal(routed, again)  # the same model routes the same tokens the same way


def test_a_dense_model_records_nothing():
    from transformers import GlmConfig, GlmForCausalLM

    dense = GlmForCausalLM(
        GlmConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            pad_token_id=0,
        )
    ).eval()
    rec = _route(dense, [torch.arange(8)])
    assert rec.layers == [] and rec.result() is None


def test_a_planted_router_bias_moves_its_layer_first():
    """Planted: expert 0's score-correction bias raised in layer 2 only. Layer 1 routes as before (it comes first and
    the bias does not reach it); layer 2 sends tokens elsewhere."""
    model = _moe()
    windows = [torch.arange(32) % 64]
    before = _route(model, windows)
    with torch.no_grad():
        routers(model)[2].e_score_correction_bias[0] += 1.0  # sigmoid scores are in (0, 1): expert 0 now always wins
    after = _route(model, windows)
    d = routing_drift(before.result(), after.result(), before.layers)
    assert d["routing_layers"]["1"] == {"changed": 0.0, "overlap": 1.0}
    assert d["routing_layers"]["2"]["changed"] > 0.5 and d["routing_overlap"] < 1.0
