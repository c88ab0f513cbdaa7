"""Weight sizes of compressed-tensors checkpoints (ct-w4a16, ct-w8a8): moved to :mod:`qbench.methods.ct_sizing`,
where the methods' own size models use them; the names stay importable from here."""

from __future__ import annotations

from qbench.methods.ct_sizing import SHAPE_BYTES, CTLayout, layout  # noqa: F401
