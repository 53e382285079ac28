"""How embeddings are finished for an index: unit-length float vectors, or binary codes packed 8 bits to a byte.

numpy only, so that both the embedding side (`features.embedding`) and the index side (`search.index`) use the same
definitions: a code bit is 1 where the model's output is >= 0, and codes are compared by Hamming distance.
"""
from __future__ import annotations

import numpy as np

from tf_retrieval.errors import InvalidInputError

#: popcount of every byte value.
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int32)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def code_bytes(bits: int) -> int:
    """Bytes per packed code: 48 bits take 6."""
    return (int(bits) + 7) // 8


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """Real-valued or +-1 codes [n, bits] -> packed uint8 [n, ceil(bits / 8)] (bit = output >= 0)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise InvalidInputError(f"codes must have shape [n, bits], got {list(codes.shape)}")
    return np.packbits(codes >= 0, axis=1)


def hamming_distances(query_codes: np.ndarray, database_codes: np.ndarray) -> np.ndarray:
    """Packed codes [q, B] and [n, B] (from `pack_codes`) -> Hamming distances [q, n] (int32), by byte popcount."""
    xor = np.bitwise_xor(np.asarray(query_codes, np.uint8)[:, None, :], np.asarray(database_codes, np.uint8)[None, :, :])
    return _POPCOUNT[xor].sum(axis=-1, dtype=np.int32)


def finish(outputs: np.ndarray, hash_bits: int | None = None) -> np.ndarray:
    """A model's outputs -> the vectors an index holds.

    Float models: rows scaled to unit length (float32; already unit rows pass unchanged). Hashing models: codes packed
    to uint8 [n, ceil(hash_bits / 8)]; codes that are already packed (uint8 of that width, e.g. from a second call)
    pass unchanged.

    Raises:
      InvalidInputError: outputs of the wrong shape for `hash_bits`, or NaN / infinite values.
    """
    outputs = np.asarray(outputs)
    if outputs.ndim != 2:
        raise InvalidInputError(f"model outputs must have shape [n, d], got {list(outputs.shape)}")
    if hash_bits:
        if outputs.dtype == np.uint8 and outputs.shape[1] == code_bytes(hash_bits):
            return outputs
        if outputs.shape[1] != hash_bits:
            raise InvalidInputError(f"a {hash_bits}-bit hashing model must output [n, {hash_bits}] codes, got "
                                    f"{list(outputs.shape)}")
    if not np.isfinite(outputs).all():
        raise InvalidInputError("the model's outputs contain NaN or infinite values")
    return pack_codes(outputs) if hash_bits else l2_normalize(outputs)
