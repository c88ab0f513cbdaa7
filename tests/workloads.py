"""The short workload for tests that judge what happens around a case (results files, processes, signals, messages,
placement, CLI plumbing), not the drift statistics themselves.

256 scored positions (two 128-token windows) and 2 greedy tokens per prompt instead of the default 4,096 and 24, and
one speed run of 2 new tokens after an 8-token prompt. On glm-tiny that makes the reference's scoring and every
case's scoring 16 times shorter and the greedy continuations 12 times shorter: on a 2-core AMD EPYC (AVX2),
tests/test_results_safety.py's narrower-resume run (bf16 and fp32 with their reference, in-process) went from 14.8 s
to 2.2 s. The shipped baselines are for the default workload (its fingerprint), so a test on this workload uses
baselines of its own, or expects the shipped ones to refuse it (before any model work).
"""

from __future__ import annotations

# As Workload(...) keyword arguments.
SHORT = dict(max_positions=256, greedy_tokens=2, contexts=(8,), new_tokens=2, repeat=1, warmup=0)

# As `qbench run` / `qbench baseline update` options.
SHORT_ARGS = ["--repeat", "1", "--new-tokens", "2", "--context", "8", "--max-positions", "256", "--greedy-tokens", "2"]
