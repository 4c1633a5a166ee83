"""Text embeddings: a text's last hidden states pooled into one L2-normalized vector.

Pooling: `mean` of every token's state (the default, as sentence-transformers
models built on decoders are often used), `cls` the first token's, `last` the
last token's (what causal models trained for embeddings read).
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError

POOLINGS = ("mean", "cls", "last")


class EmbeddingError(UserError, ValueError):
    pass


def pool(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """(n, dim) hidden states -> one unit vector (dim,), in float32."""
    if pooling == "mean":
        vector = hidden.astype(np.float64).mean(axis=0)
    elif pooling == "cls":
        vector = hidden[0].astype(np.float64)
    elif pooling == "last":
        vector = hidden[-1].astype(np.float64)
    else:
        raise EmbeddingError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    norm = np.linalg.norm(vector)
    return (vector / norm if norm > 0 else vector).astype(np.float32)
