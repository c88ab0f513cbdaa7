"""What this machine offers a run: the one check of a ``--device`` and the one probe of free memory.

:func:`check_device` refuses a device qbench cannot use (not a torch device, neither cpu nor cuda, or a GPU not
visible here); ``qbench run``, the pytest plugin and ``qbench estimate`` all go through it, the estimate without the
visibility check since it sizes a run for a machine it need not be on. :func:`available_bytes` is the free memory
of one device now (``torch.cuda.mem_get_info`` on a GPU, psutil's available memory on the CPU): the estimate judges
its fit against it, and :func:`qbench.run.devices.memory_budgets` starts a device-map plan from it.
"""

from __future__ import annotations

from qbench.errors import UsageError


def check_device(device: str, *, visible: bool = True) -> str:
    """``device`` when qbench can use it, else a :class:`~qbench.errors.UsageError` naming ``--device``.

    ``visible``: a CUDA device must be visible here (``qbench run``). Without it (``qbench estimate``) any GPU index
    is accepted, and the device must be spelled cpu, cuda or cuda:N, the names the estimate reads.
    """
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not visible:
            return device
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is visible here; use --device cpu or run on a GPU box")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: qbench runs on cpu or cuda")
    elif not visible and device != "cpu":  # cpu:0: a torch device, but not one the estimate reads
        raise UsageError(f"--device {device}: not a device; use cpu, cuda or cuda:N")
    return device


def available_bytes(device: str) -> tuple[int | None, str]:
    """Memory free for a run on ``device`` now: (bytes or None, where the figure came from)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None, "no CUDA device visible here"
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free, f"torch.cuda.mem_get_info({device})"
    import psutil

    return psutil.virtual_memory().available, "psutil.virtual_memory().available"
