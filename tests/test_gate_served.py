"""A served model gated the same way: `pytest --pyargs qbench.gate --qbench-endpoint URL` (or [[tool.qbench.endpoints]])
runs the served case against the stored reference, one test `glm-tiny-endpoint`; a server with noisy logits fails it
with the drift verdict's reason. The server is tests/test_endpoint.py's fake (glm-tiny's fp32 forward over HTTP)."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import pytest
from test_endpoint import NAME, Fake, handler_for
from workloads import SHORT

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


# The short workload (tests/workloads.py) as [tool.qbench.workload]: the served runs score 254 positions, not 4,064.
WORKLOAD = "[tool.qbench.workload]\n" + "".join(
    f"{k} = {list(v) if isinstance(v, tuple) else v}\n" for k, v in SHORT.items()
)


def test_a_served_model_is_gated_against_the_stored_reference(pytester, server):
    fake, url = server
    gate = ["--pyargs", "qbench.gate", "-v", "-p", "no:cacheprovider"]
    # The reference the served model is judged against, recorded by the gate's own baseline update.
    pytester.makepyprojecttoml(f'[tool.qbench]\nmodels = ["{NAME}"]\nmethods = ["bf16"]\n' + WORKLOAD)
    r = pytester.runpytest_inprocess(*gate, "--qbench-update-baselines")
    assert r.ret == 0, "\n".join(r.outlines)
    assert (pytester.path / "baselines" / NAME / "reference-bf16" / "cpu" / "reference.json").is_file()

    fake.fault = None
    served = ["--qbench-endpoint", url, "--qbench-served-model", NAME]
    r = pytester.runpytest_inprocess(*gate, *served)
    assert r.ret == 0, "\n".join(r.outlines)
    r.stdout.fnmatch_lines(["*test_case_passes_its_gates?glm-tiny-endpoint? PASSED*"])

    # The same served model from [tool.qbench], its server now adding noise to every logit (a broken kernel).
    pytester.makepyprojecttoml(
        f'[tool.qbench]\n{WORKLOAD}[[tool.qbench.endpoints]]\nurl = "{url}"\nmodel = "{NAME}"\nconcurrency = [1]\n'
        "requests = 2\n"
    )
    fake.fault = "perturb"
    try:
        r = pytester.runpytest_inprocess(*gate)
    finally:
        fake.fault = None
    assert r.ret == 1, "\n".join(r.outlines)
    r.stdout.fnmatch_lines(["*glm-tiny-endpoint: drift: kld_mean *"])
