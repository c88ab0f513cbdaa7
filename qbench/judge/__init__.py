"""The judge wing: stored baselines and references, fingerprints, tolerances with provenance, verdicts."""
