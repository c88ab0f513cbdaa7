"""A served model: a small client for OpenAI-compatible servers (vLLM, SGLang, llama.cpp's server, ``transformers
serve``), standard library only. It knows HTTP and the OpenAI/vLLM JSON shapes, nothing of qbench's models or
verdicts (the run layer, :mod:`qbench.run.endpoint`, turns its answers into a case)."""
