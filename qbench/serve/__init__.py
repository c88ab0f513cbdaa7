"""A served model: how qbench talks to OpenAI-compatible servers (vLLM, SGLang, llama.cpp's server, ``transformers
serve``), standard library only. ``client`` speaks HTTP and the OpenAI/vLLM JSON shapes, ``errors`` says what a
server's error means, ``faults`` the fix for each, ``handshake`` finds the served model and engine before a case,
``protocol`` asks for log-probs, greedy continuations and the timed request and checks the answers. It knows nothing
of qbench's verdicts: the run layer (:mod:`qbench.run.endpoint`) turns its answers into a case."""
