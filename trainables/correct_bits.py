"""Which test examples a model classified correctly, as the compact bytes a result row stores.

Encoding (the `correct` column of orchestrator/result_schema.py): example i of the evaluation order (the
test set's first N images, `test_subset`, in their order) is bit i % 8 of byte i // 8, least
significant bit first (`numpy.packbits(mask, bitorder="little")`); 1 = still classified
correctly. ceil(N / 8) bytes, the unused high bits of the last byte 0; N is the row's
`n_examples`. 1,000 examples take 125 bytes.
"""
from __future__ import annotations

import numpy as np


def pack_correct(mask) -> bytes:
    """A (N,) bool mask (torch tensor or array) as bytes in the encoding above."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 1:
        raise ValueError(f"expected a (N,) mask of examples, got shape {mask.shape}")
    return np.packbits(mask, bitorder="little").tobytes()


def unpack_correct(data: bytes, n_examples: int) -> np.ndarray:
    """The (n_examples,) bool mask `pack_correct` encoded. Raises ValueError when `data` is not
    ceil(n_examples / 8) bytes or a padding bit is set (the bytes belong to another N)."""
    raw = np.frombuffer(bytes(data), dtype=np.uint8)
    if len(raw) != (n_examples + 7) // 8:
        raise ValueError(f"{len(raw)} bytes of per-example correctness for {n_examples} examples; "
                         f"expected {(n_examples + 7) // 8}")
    bits = np.unpackbits(raw, bitorder="little").astype(bool)
    if bits[n_examples:].any():
        raise ValueError(f"per-example correctness for {n_examples} examples has bits set past the last example")
    return bits[:n_examples]
