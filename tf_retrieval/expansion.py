"""Query expansion: re-query with the query averaged with its best neighbours.

α-QE (Radenović et al., "Fine-tuning CNN Image Retrieval with No Human Annotation", 2018): the new query is the
normalised sum of the query and its top-k neighbours, each neighbour weighted by its similarity to the query raised to
the power α. α = 0 is plain average query expansion (AQE, Chum et al. 2007). It helps most when the top results are
mostly relevant, so it is an option of search, not a default.
"""
from __future__ import annotations

import numpy as np


def alpha_query_expansion(queries: np.ndarray, neighbours: np.ndarray, scores: np.ndarray,
                          alpha: float = 3.0) -> np.ndarray:
    """New unit-length queries from queries [q, d], their top-k neighbour vectors [q, k, d] and similarities [q, k].

    Missing neighbours (score -inf or NaN, e.g. index padding) are ignored; negative similarities weigh 0.
    """
    queries = np.asarray(queries, np.float32)
    neighbours = np.asarray(neighbours, np.float32)
    scores = np.asarray(scores, np.float32)
    if neighbours.shape[:2] != scores.shape or neighbours.shape[0] != len(queries) or neighbours.shape[2:] != queries.shape[1:]:
        raise ValueError(f"shapes do not match: queries {queries.shape}, neighbours {neighbours.shape}, "
                         f"scores {scores.shape}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    weights = np.where(np.isfinite(scores), np.clip(scores, 0.0, None), 0.0) ** alpha
    weights = np.where(np.isfinite(scores), weights, 0.0)
    unit = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    expanded = unit + np.einsum("qk,qkd->qd", weights, np.nan_to_num(neighbours))
    return (expanded / np.maximum(np.linalg.norm(expanded, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def expand_exact(queries: np.ndarray, database: np.ndarray, k: int = 5, alpha: float = 3.0) -> np.ndarray:
    """α-QE against a database matrix [n, d] (cosine similarity, exact top-k): for evaluation."""
    from tf_retrieval.index import ExactIndex

    index = ExactIndex(database.shape[1], metric="cosine")
    index.add(database, np.arange(len(database)))
    scores, ids = index.search(queries, k)
    unit = database / np.maximum(np.linalg.norm(database, axis=1, keepdims=True), 1e-12)
    return alpha_query_expansion(queries, unit[np.maximum(ids, 0)], np.where(ids >= 0, scores, -np.inf), alpha)
