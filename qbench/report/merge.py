"""``qbench merge OUT IN...``: one results file from the shards of a run (CI machines, xdist workers, GPUs)."""

from __future__ import annotations

from pathlib import Path

from qbench.errors import UsageError
from qbench.report.results import load_results, write_json


def merge(inputs: list[Path]) -> dict:
    """Cases of every input, in order; a case id met twice is bad input (two shards ran the same case)."""
    docs = [load_results(p) for p in inputs]
    seen: dict[str, Path] = {}
    cases = []
    for path, doc in zip(inputs, docs, strict=True):
        for c in doc["cases"]:
            if c["id"] in seen:
                raise UsageError(f"case {c['id']} is in both {seen[c['id']]} and {path}; merge each shard once")
            seen[c["id"]] = path
            cases.append(c)
    return {
        "schema": docs[0]["schema"],
        "env": docs[0]["env"],
        "shards": [
            {"path": str(p), "env": d["env"], "config": d.get("config"), "wall_s": d.get("wall_s")}
            for p, d in zip(inputs, docs, strict=True)
        ],
        "config": docs[0].get("config"),
        "wall_s": sum(d.get("wall_s") or 0 for d in docs),
        "cases": cases,
    }


def merge_files(out: Path, inputs: list[Path]) -> dict:
    if out in inputs:
        raise UsageError(f"{out} is also an input; write the merged results to a new file")
    doc = merge(inputs)
    write_json(doc, out)
    return doc
