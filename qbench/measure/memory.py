"""Peak memory of a stage, with the source of each figure recorded.

CPU: the kernel's resident-set high-water mark (``VmHWM`` in /proc/self/status), reset at the start of the
stage by writing ``5`` to /proc/self/clear_refs (Linux >= 4.0). The kernel tracks it on every page fault, so
nothing between samples is missed. Where that file cannot be written (other kernels, some sandboxes), a
psutil thread samples RSS every 5 ms instead; it misses peaks shorter than the interval, and says so in
``source``.

CUDA: ``torch.cuda.reset_peak_memory_stats`` before the stage, ``max_memory_allocated`` and
``max_memory_reserved`` after it, around a synchronize; and NVML's per-process figure sampled in a thread
(:class:`NvmlSampler`), which falls back to a recorded reason when NVML cannot be used.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

SAMPLE_INTERVAL_S = 0.005


@dataclass
class PeakMemory:
    peak_bytes: int = 0
    start_bytes: int = 0
    reserved_bytes: int | None = None  # CUDA: the caching allocator's reserved peak
    nvml_bytes: int | None = None  # CUDA: this process's device memory as the driver sees it (nvidia-smi's)
    nvml_note: str | None = None  # why there is no NVML figure, when there is none
    source: str = ""
    # CUDA, a model spread over several GPUs: each GPU's allocator peak, by index (peak_bytes is the main device's)
    per_device_bytes: dict[int, int] | None = None

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)


def _vmhwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim) before a CPU stage starts.

    glibc keeps freed memory mapped for reuse (and raises its mmap threshold as large blocks are freed, so tensors
    of a few hundred KiB end up in that heap). Those pages count in RSS: left in place they inflate the stage's
    start and hide its growth when it reuses them; a test that planted retention of 32 MiB of log-probs saw only
    7 MiB of growth that way (tests/test_reference_store.py).
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim, figures as they are
        ctypes.CDLL(None).malloc_trim(0)


def _reset_vmhwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss

    def run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self.join()
        return max(self.peak, self._proc.memory_info().rss)


NVML_INTERVAL_S = 0.010


class NvmlSampler(threading.Thread):
    """Polls NVML for this process's memory on one GPU every 10 ms (what nvidia-smi shows: the CUDA context,
    the caching allocator's reserve and other libraries' allocations). Peaks shorter than the interval can be
    missed; the allocator figures above cannot miss anything, but see only torch's own allocations."""

    def __init__(self, device_index: int) -> None:
        super().__init__(daemon=True)
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self._stop = threading.Event()
        self.peak = 0

    def _sample(self) -> None:
        pid = os.getpid()
        for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if p.pid == pid and p.usedGpuMemory:
                self.peak = max(self.peak, p.usedGpuMemory)

    def run(self) -> None:
        while not self._stop.wait(NVML_INTERVAL_S):
            self._sample()

    def stop(self) -> int:
        self._stop.set()
        self.join()
        self._sample()
        return self.peak


def start_nvml(device: str) -> tuple[NvmlSampler | None, str | None]:
    """An NVML sampler for ``device``, or None and the reason (nvidia-ml-py missing, no driver, ...)."""
    try:
        import torch

        index = torch.device(device).index
        sampler = NvmlSampler(torch.cuda.current_device() if index is None else index)
    except ImportError:
        return None, "NVML unavailable: nvidia-ml-py is not installed (pip install 'qbench[gpu]')"
    except Exception as e:
        return None, f"NVML unavailable: {type(e).__name__}: {e}"
    sampler.start()
    return sampler, None


class track_peak:
    """``with track_peak(device) as mem: ...`` leaves the stage's peak in ``mem``."""

    def __init__(self, device: str, also: tuple[int, ...] = ()) -> None:
        """``also``: further CUDA device indices whose allocator peaks are kept too (a model spread by a device map)."""
        self.device = device
        self.also = tuple(also)
        self.result = PeakMemory()
        self._sampler: _Sampler | None = None
        self._nvml: NvmlSampler | None = None

    def __enter__(self) -> PeakMemory:
        import psutil

        if self.device.startswith("cuda"):
            import torch

            for index in self.also:
                torch.cuda.synchronize(index)
                torch.cuda.reset_peak_memory_stats(index)
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.result.start_bytes = torch.cuda.memory_allocated(self.device)
            self.result.source = "torch.cuda.max_memory_allocated"
            self._nvml, self.result.nvml_note = start_nvml(self.device)
            return self.result
        _trim_heap()
        self.result.start_bytes = psutil.Process(os.getpid()).memory_info().rss
        if _reset_vmhwm() and _vmhwm_bytes() is not None:
            self.result.source = "rss:VmHWM"
        else:
            self._sampler = _Sampler()
            self._sampler.start()
            self.result.source = f"rss:psutil sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms"
        return self.result

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            self.result.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            if self.also:
                for index in self.also:
                    torch.cuda.synchronize(index)
                self.result.per_device_bytes = {i: torch.cuda.max_memory_allocated(i) for i in self.also}
            self.result.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
            if self._nvml is not None:
                self.result.nvml_bytes = self._nvml.stop()
        elif self._sampler is not None:
            self.result.peak_bytes = self._sampler.stop()
        else:
            self.result.peak_bytes = _vmhwm_bytes() or 0
