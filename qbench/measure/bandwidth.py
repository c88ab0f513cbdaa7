"""Achieved weight-read bandwidth during decoding, and the device's peak to compare it with.

Each decode step reads every weight once (the input embedding excepted: a step reads one row of it), so
achieved bandwidth = weight bytes read per step × steps per second. Batched decoding reads the weights once
per step for the whole batch.
"""

from __future__ import annotations

import functools
import time

# Published peak memory bandwidth (vendor data sheets), GB/s, matched on the device name reported by torch.
KNOWN_PEAKS_GB_S = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 80GB HBM3": 3350.0,
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100-SXM4-40GB": 1555.0,
    "L40S": 864.0,
    "RTX 4090": 1008.0,
}


def known_peak_gb_s(device_name: str) -> float | None:
    for key, value in KNOWN_PEAKS_GB_S.items():
        if key.lower() in device_name.lower():
            return value
    return None


@functools.lru_cache(maxsize=1)
def measured_cpu_copy_gb_s(mbytes: int = 64, repeat: int = 5) -> float:
    """Best of ``repeat`` copies of a ``mbytes`` MB buffer: bytes read + bytes written per second."""
    import torch

    src = torch.ones(mbytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def decode_bandwidth(
    weight_bytes: int, embedding_bytes: int, decode_tok_s: float, batch: int, device: str, device_name: str
) -> dict:
    per_step = weight_bytes - embedding_bytes
    achieved = per_step * decode_tok_s / batch / 1e9
    if device.startswith("cuda"):
        peak, source = known_peak_gb_s(device_name), "data sheet"
    else:
        peak, source = measured_cpu_copy_gb_s(), "measured: 64 MiB tensor copy (past the last-level cache), best of 5"
    return {
        "weight_read_bytes_per_step": per_step,
        "achieved_gb_s": achieved,
        "peak_gb_s": peak,
        "peak_source": source if peak else "unknown for this device",
        "share_of_peak": achieved / peak if peak else None,
    }
