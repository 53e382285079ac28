"""Near-duplicate groups in an indexed collection: connected components of the pairs that score >= a threshold.

The same idea as imagededup's CNN method (cosine similarity of CNN encodings >= ``min_similarity_threshold``), run on the
vectors already stored in an index, so nothing is embedded again: every stored vector queries the index for its
neighbours, every pair scoring at least `threshold` is an edge, and each connected component of two or more images is a
group. Components are transitive: a ~ b and b ~ c put a, b and c in one group even if a and c score below the threshold
(a chain of small edits), as in imagededup's grouping.

Scores are the index's similarities (`index.METRICS`): cosine in [-1, 1] for the default metric, minus the squared
distance for "euclidean" (so a threshold there is e.g. -0.01). With an exact index every qualifying pair is found; with
ScaNN the neighbour lists are approximate, so a pair can be missed when neither image finds the other.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import numpy as np

from tf_retrieval.errors import InvalidInputError
from tf_retrieval.search.index import Index

if TYPE_CHECKING:
    from tf_retrieval.search.engine import RetrievalEngine


@dataclasses.dataclass
class DuplicateGroup:
    """Images that are near-duplicates of each other (directly or through a chain of pairs).

    Attributes:
      positions: their positions in the collection, ascending.
      ids: their image ids, in the same order.
      pairs: the qualifying pairs inside the group as (id, id, score), best first.
    """

    positions: list[int]
    ids: list[str]
    pairs: list[tuple[str, str, float]]

    def to_dict(self) -> dict:
        return {"ids": self.ids, "positions": self.positions,
                "pairs": [[a, b, round(score, 6)] for a, b, score in self.pairs]}


def duplicate_pairs(index: Index, threshold: float, *, k: int = 10, batch_size: int = 1024) -> dict[tuple[int, int], float]:
    """Every pair of indexed vectors whose similarity is >= `threshold`.

    Each stored vector asks for its `k` best neighbours; a query whose k-th neighbour still qualifies asks again for
    4x more, until its list ends below the threshold or covers the whole index, so `k` only tunes speed.

    Args:
      index: any `Index`.
      threshold: the minimum similarity of a pair.
      k: neighbours fetched per image at first.
      batch_size: queries per search call.

    Returns:
      {(id_a, id_b): score} with id_a < id_b (index ids), each pair once.

    Raises:
      ValueError: k or batch_size < 1.
    """
    if k < 1 or batch_size < 1:
        raise InvalidInputError(f"k and batch_size must be positive, got {k} and {batch_size}")
    threshold = float(threshold)
    ids, total = index.ids, len(index)
    pairs: dict[tuple[int, int], float] = {}
    for start in range(0, total, batch_size):
        batch_ids = ids[start:start + batch_size]
        queries = index.get_vectors(batch_ids)
        pending = np.arange(len(batch_ids))
        fetch = min(k + 1, total)  # + 1: an image finds itself
        while len(pending):
            scores, found = index.search(queries[pending], fetch)
            for row, query_row in enumerate(pending):
                own = int(batch_ids[query_row])
                for score, other in zip(scores[row], found[row]):
                    other = int(other)
                    if other < 0 or score < threshold:
                        break  # best first: the rest score lower
                    if other != own:
                        key = (own, other) if own < other else (other, own)
                        pairs[key] = max(pairs.get(key, -np.inf), float(score))
            if fetch >= total:
                break
            full = scores[:, -1] >= threshold
            pending = pending[full]
            fetch = min(fetch * 4, total)
    return pairs


def connected_groups(pairs: dict[tuple[int, int], float]) -> list[list[int]]:
    """Connected components (of two or more members) of the graph whose edges are `pairs`, each sorted, ordered by
    their smallest member."""
    parent: dict[int, int] = {}

    def root(node: int) -> int:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]  # path halving
            node = parent[node]
        return node

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for node in parent:
        members.setdefault(root(node), []).append(node)
    return sorted((sorted(group) for group in members.values() if len(group) > 1), key=lambda group: group[0])


def find_duplicates(engine: RetrievalEngine, threshold: float = 0.95, *, k: int = 10) -> list[DuplicateGroup]:
    """Near-duplicate groups among the indexed images of `engine` (see the module docstring).

    Args:
      engine: a loaded index bundle (`RetrievalEngine.load`); its stored vectors are used, no image is embedded.
      threshold: the minimum similarity of a duplicate pair (cosine for the default metric).
      k: neighbours fetched per image at first (more are fetched where needed).

    Returns:
      the groups, ordered by their first position; images without a duplicate are in none.
    """
    pairs = duplicate_pairs(engine.index, threshold, k=k)
    positions_of = dict(zip(engine.index.ids.tolist(), engine.positions_of(engine.index.ids).tolist()))
    ids = engine.collection.ids
    groups = []
    components = connected_groups(pairs)
    group_of = {member: number for number, members in enumerate(components) for member in members}
    edges_of: list[list] = [[] for _ in components]  # each pair under its group, in one pass over the pairs
    for (a, b), score in pairs.items():
        edges_of[group_of[a]].append((ids[positions_of[a]], ids[positions_of[b]], score))
    for members, edges in zip(components, edges_of):
        positions = sorted(positions_of[m] for m in members)
        groups.append(DuplicateGroup(positions=positions, ids=[ids[p] for p in positions],
                                     pairs=sorted(edges, key=lambda edge: (-edge[2], edge[0], edge[1]))))
    return sorted(groups, key=lambda group: group.positions[0])


def write_report(path: str, engine: RetrievalEngine, groups: list[DuplicateGroup], *, bundle: str, threshold: float,
                 k: int) -> None:
    """Writes the groups of `find_duplicates` and the settings that found them to a JSON file (atomically)."""
    from tf_retrieval.storage import write_json

    write_json(path, {"bundle": os.path.abspath(bundle), "threshold": threshold, "metric": engine.index.metric, "k": k,
                      "images": len(engine), "groups": [group.to_dict() for group in groups]}, indent=1)
