"""A served model gated the same way: `pytest --pyargs qbench.gate --qbench-endpoint URL` (or [[tool.qbench.endpoints]])
runs the served case against the stored reference, one test `glm-tiny-endpoint`; a server with noisy logits fails it
with the drift verdict's reason. The server is tests/test_endpoint.py's fake (glm-tiny's fp32 forward over HTTP)."""

from __future__ import annotations

import shutil
import threading
from http.server import ThreadingHTTPServer

import pytest
from test_endpoint import NAME, Fake, handler_for

from qbench.judge.store import default_root

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def server():
    import torch
    from transformers import AutoModelForCausalLM

    from qbench.models import zoo

    fake = Fake(AutoModelForCausalLM.from_pretrained(zoo.resolve(NAME), dtype=torch.float32).eval())
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(fake))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield fake, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow  # two served cases on the default workload (the stored reference's): ~10 s each on 2 idle cores
def test_a_served_model_is_gated_against_the_stored_reference(pytester, server):
    fake, url = server
    baselines = pytester.path / "baselines"
    shutil.copytree(default_root() / NAME / "reference-bf16", baselines / NAME / "reference-bf16")
    gate = ["--pyargs", "qbench.gate", "-v", "-p", "no:cacheprovider"]

    fake.fault = None
    served = ["--qbench-endpoint", url, "--qbench-served-model", NAME]
    r = pytester.runpytest_inprocess(*gate, *served)
    assert r.ret == 0, "\n".join(r.outlines)
    r.stdout.fnmatch_lines(["*test_case_passes_its_gates?glm-tiny-endpoint? PASSED*"])

    # The same served model from [tool.qbench], its server now adding noise to every logit (a broken kernel).
    pytester.makepyprojecttoml(
        f'[tool.qbench]\n[[tool.qbench.endpoints]]\nurl = "{url}"\nmodel = "{NAME}"\nconcurrency = [1]\nrequests = 2\n'
    )
    fake.fault = "perturb"
    try:
        r = pytester.runpytest_inprocess(*gate)
    finally:
        fake.fault = None
    assert r.ret == 1, "\n".join(r.outlines)
    r.stdout.fnmatch_lines(["*glm-tiny-endpoint: drift: kld_mean *"])
