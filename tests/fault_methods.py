"""Methods that fail the way real cases do, for the isolation tests (imported by case processes through
QBENCH_METHOD_MODULES). Each wraps bnb-nf4 and fails after loading, as an OOM or a kernel fault would."""

from __future__ import annotations

import os
import time

import torch

from qbench.methods.bnb import NF4
from qbench.methods.registry import register


@register
class Raises(NF4):
    name = "fault-raise"
    description = "raises a RuntimeError like a CUDA error does"

    def load(self, req):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (planted)")


@register
class Aborts(NF4):
    name = "fault-abort"
    description = "aborts the process, as a failed C++ assertion does"

    def load(self, req):
        super().load(req)
        os.abort()


@register
class Segfaults(NF4):
    name = "fault-segv"
    description = "dies of SIGSEGV"

    def load(self, req):
        import ctypes

        ctypes.string_at(0)


@register
class Hogs(NF4):
    name = "fault-oom"
    description = "allocates 8 GiB, past any limit the test sets"

    def load(self, req):
        model = super().load(req)
        model.hog = torch.ones(2 * 2**30)  # 8 GiB of float32
        return model


@register
class Hangs(NF4):
    name = "fault-hang"
    description = "never returns"

    def load(self, req):
        time.sleep(3600)
