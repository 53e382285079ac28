"""Query-time logic over retrieval engines: what the web page, the CLI and the servers share.

- α query expansion: re-query with the query averaged with its best neighbours. α-QE (Radenović et al., "Fine-tuning
  CNN Image Retrieval with No Human Annotation", 2018): the new query is the normalised sum of the query and its top-k
  neighbours, each neighbour weighted by its similarity to the query raised to the power α. α = 0 is plain average query
  expansion (AQE, Chum et al. 2007). It helps most when the top results are mostly relevant, so it is an option of
  search, not a default.
- α database-side augmentation (α-DBA, same paper; DBA: Arandjelović & Zisserman 2012): the same averaging applied
  once to every database vector over its nearest other database vectors, before indexing. Queries then meet
  neighbourhoods instead of single images. Like α-QE it pays where neighbours are mostly relevant (many small classes,
  e.g. flowers) and costs where they are not, so it is an option of `tfr index` and of evaluation.
- Rocchio relevance feedback: move the query towards images marked relevant (favourites).
- `Searcher`: one or more named engines (e.g. baseline and fine-tuned) answering a `Query` (an image, a database image,
  favourites) with filters (k, threshold, classes), for one model or side by side for all, or for a random database
  image.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from tf_retrieval.data.images import decode_image
from tf_retrieval.errors import InvalidInputError, MissingError
from tf_retrieval.vectors import l2_normalize

if TYPE_CHECKING:
    from tf_retrieval.search.engine import RetrievalEngine, SearchResult

#: Rocchio defaults (the classic SMART values): q' = alpha * q + beta * mean(positives), re-normalised.
ROCCHIO_ALPHA, ROCCHIO_BETA = 1.0, 0.75
#: Longest image id looked up (ids are paths relative to a folder, or tfds ids).
MAX_ID_LENGTH = 1024


def alpha_query_expansion(queries: np.ndarray, neighbours: np.ndarray, scores: np.ndarray,
                          alpha: float = 3.0) -> np.ndarray:
    """New unit-length queries from queries [q, d], their top-k neighbour vectors [q, k, d] and similarities [q, k].

    Missing neighbours (score -inf or NaN, e.g. index padding) are ignored; negative similarities weigh 0.
    """
    queries = np.asarray(queries, np.float32)
    neighbours = np.asarray(neighbours, np.float32)
    scores = np.asarray(scores, np.float32)
    if neighbours.shape[:2] != scores.shape or neighbours.shape[0] != len(queries) or neighbours.shape[2:] != queries.shape[1:]:
        raise InvalidInputError(f"shapes do not match: queries {queries.shape}, neighbours {neighbours.shape}, "
                         f"scores {scores.shape}")
    if alpha < 0:
        raise InvalidInputError(f"alpha must be >= 0, got {alpha}")
    weights = np.where(np.isfinite(scores), np.clip(scores, 0.0, None), 0.0) ** alpha
    weights = np.where(np.isfinite(scores), weights, 0.0)
    unit = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    expanded = unit + np.einsum("qk,qkd->qd", weights, np.nan_to_num(neighbours))
    return (expanded / np.maximum(np.linalg.norm(expanded, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def expand_with_index(index, queries: np.ndarray, k: int, alpha: float = 3.0) -> np.ndarray:
    """α-QE of `queries` [q, d] over their top-k in a built index (`search.index.Index`, float vectors)."""
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if len(index) == 0:
        return l2_normalize(queries)
    scores, ids = index.search(queries, min(k, len(index)))
    known = np.where(ids >= 0, ids, ids.max())  # padding (-1) gets weight 0 below
    neighbours = index.get_vectors(known.ravel()).reshape(ids.shape + (-1,))
    return alpha_query_expansion(queries, neighbours, np.where(ids >= 0, scores, -np.inf), alpha)


def _exact_index(database: np.ndarray):
    """An exact cosine index over `database` [n, d], ids = positions."""
    from tf_retrieval.search.index import ExactIndex

    index = ExactIndex(database.shape[1], metric="cosine")
    index.add(database, np.arange(len(database)))
    return index


def expand_exact(queries: np.ndarray, database: np.ndarray, k: int = 5, alpha: float = 3.0) -> np.ndarray:
    """α-QE against a database matrix [n, d] (cosine similarity, exact top-k): for evaluation."""
    return expand_with_index(_exact_index(database), queries, k, alpha)


def augment_database(database: np.ndarray, k: int = 5, alpha: float = 3.0) -> np.ndarray:
    """α-DBA: each database vector [n, d] replaced by the α-weighted sum of itself and its k nearest *other* database
    vectors (cosine, exact), re-normalised; float32 [n, d]. Exhaustive: n x n similarities, in bounded chunks.

    Raises:
      InvalidInputError: k < 1, or vectors that are not float (binary hash codes cannot be averaged).
    """
    database = np.asarray(database)
    if not np.issubdtype(database.dtype, np.floating) or database.ndim != 2:
        raise InvalidInputError(f"database augmentation averages float vectors [n, d], got {database.dtype} "
                                f"{list(database.shape)} (a hashing model's binary codes cannot be augmented)")
    if k < 1:
        raise InvalidInputError(f"database augmentation needs k >= 1 neighbours, got {k}")
    n = len(database)
    k = min(k, n - 1)
    if k < 1:
        return l2_normalize(database)
    index = _exact_index(database)
    scores, ids = index.search(database, k + 1)
    # drop each vector's own entry (usually first; with exact duplicates maybe later, or beyond the top k + 1)
    own = ids == np.arange(n)[:, None]
    own[~own.any(axis=1), -1] = True
    ids, scores = ids[~own].reshape(n, k), scores[~own].reshape(n, k)
    return alpha_query_expansion(database, index.get_vectors(ids.ravel()).reshape(n, k, -1), scores, alpha)


def rocchio(query: np.ndarray | None, positives: np.ndarray, alpha: float = ROCCHIO_ALPHA,
            beta: float = ROCCHIO_BETA) -> np.ndarray:
    """Rocchio relevance feedback: q' = alpha * q + beta * mean(positives), L2-normalised.

    Args:
      query: the query embedding [d] (or None: the feedback vector alone, i.e. the favourites' centroid).
      positives: float embeddings of the images marked relevant, [m, d] with m >= 1.
      alpha: weight of the original query.
      beta: weight of the positives' mean.

    Returns:
      float32 [d], unit length.

    Raises:
      InvalidInputError: empty positives, binary codes (a hashing model's vectors cannot be averaged), mismatched
        dimensions, or a zero result vector.
    """
    positives = np.asarray(positives)
    if positives.ndim != 2 or len(positives) == 0:
        raise InvalidInputError(f"rocchio needs positives of shape [m >= 1, d], got {list(positives.shape)}")
    if not np.issubdtype(positives.dtype, np.floating):
        raise InvalidInputError(f"relevance feedback (favourites) averages float embeddings, but this model's vectors "
                                f"are {positives.dtype} binary hash codes: use a model without hash_bits for feedback")
    moved = beta * positives.astype(np.float32).mean(axis=0)
    if query is not None:
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape[0] != positives.shape[1]:
            raise InvalidInputError(f"query has dimension {query.shape[0]} but positives have {positives.shape[1]}")
        moved = alpha * query + moved
    norm = float(np.linalg.norm(moved))
    if not math.isfinite(norm) or norm < 1e-12:
        raise InvalidInputError("the feedback query vector is zero: choose other favourites or a larger alpha/beta")
    return (moved / norm).astype(np.float32)


def class_labels(class_names: Sequence[str], classes: Sequence[str | int] | str | None) -> list[int] | None:
    """A class filter as sorted labels: `classes` are class names, labels or digit strings (or one comma-separated
    string of them, unless it is a class name itself); None or empty: no filter (None).

    Raises:
      InvalidInputError: an unknown class.
    """
    values = _class_values(classes, class_names)
    if not values:
        return None
    labels = [_label_of(class_names, value) for value in values]
    for value, label in zip(values, labels):
        if label is None:
            raise InvalidInputError(f"unknown class {str(value)[:100]!r} in classes; known classes: "
                                    f"{', '.join(class_names)}")
    return sorted(set(labels))


def _class_values(classes: Sequence[str | int] | str | None, class_names: Sequence[str]) -> list:
    """The classes of a filter as a list: one string that is no class name is a comma-separated list."""
    values = [classes] if isinstance(classes, str) else list(classes or [])
    if len(values) == 1 and isinstance(values[0], str) and values[0] not in class_names:  # "a, b": a list of two
        values = [v.strip() for v in values[0].split(",") if v.strip()]
    return values


def _label_of(class_names: Sequence[str], value: str | int) -> int | None:
    """The label of a class given by name, label or digit string; None for a class not in `class_names`."""
    if isinstance(value, str) and value in class_names:
        return list(class_names).index(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(class_names):
        return int(value)
    if isinstance(value, str) and value.isascii() and value.isdigit() and int(value) < len(class_names):
        return int(value)
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class Query:
    """What to search for: an image, a database image (by id), favourites, or an image or id plus favourites.

    Favourites (`positives`, database image ids) move the query by Rocchio feedback (weights `alpha`, `beta`); alone,
    their centroid is the query. The query image and the favourites are never among the results.

    Attributes:
      image: a decoded RGB uint8 image [h, w, 3] (see `from_bytes`).
      encoded: its encoded bytes (for embedders that take bytes, e.g. the TF Serving client).
      id: a database image id.
      positives: database image ids marked relevant.
      alpha: Rocchio weight of the query.
      beta: Rocchio weight of the favourites' mean.
    """

    image: np.ndarray | None = None
    encoded: bytes | None = None
    id: str | None = None
    positives: Sequence[str] = ()
    alpha: float = ROCCHIO_ALPHA
    beta: float = ROCCHIO_BETA

    def __post_init__(self):
        if (self.image is None) != (self.encoded is None):
            raise InvalidInputError("a query image needs both its decoded pixels and its encoded bytes: use "
                                    "Query.from_bytes")
        if self.image is None and self.id is None and not self.positives:
            raise InvalidInputError("no query: give an image, a database image id or favourites (positives)")

    @classmethod
    def from_bytes(cls, encoded: bytes, name: str = "image", **kwargs) -> Query:
        """A query by an encoded image, decoded now (`data.images.ImageDecodeError` says why it is not usable)."""
        return cls(image=decode_image(encoded, name=name), encoded=encoded, **kwargs)


@dataclasses.dataclass
class Answer:
    """One model's answer to a query: results (best first), the class filter applied (names), timings in ms."""

    model: str
    results: list[SearchResult]
    classes: list[str] | None
    timing_ms: dict[str, float]

    @property
    def total(self) -> int:
        return len(self.results)


#: (model name, its engine, a query with an image) -> the query image's embedding [d].
EmbedFunction = Callable[[str, "RetrievalEngine", Query], np.ndarray]


def _checked_id(image_id: Any, what: str) -> str:
    if not isinstance(image_id, str) or not image_id or len(image_id) > MAX_ID_LENGTH:
        raise InvalidInputError(f"{what} must be a database image id (a non-empty string), got {str(image_id)[:80]!r}")
    return image_id


class Searcher:
    """Searches one or more named engines (e.g. a baseline and a fine-tuned model over the same images).

    Args:
      engines: model name -> engine; `compare` answers in this order.
      default_model: the model used when a call names none (default: the first).
      embed: how query images are embedded (e.g. through an `EmbeddingBatcher`); default: the engine's `embed`.

    Raises:
      InvalidInputError: no engines, or an unknown default model.
    """

    def __init__(self, engines: Mapping[str, RetrievalEngine], default_model: str | None = None,
                 embed: EmbedFunction | None = None):
        if not engines:
            raise InvalidInputError("a search needs at least one engine, e.g. "
                                    "{'baseline': RetrievalEngine.load(bundle_dir)}")
        self.engines = dict(engines)
        self.default_model = default_model or next(iter(self.engines))
        if self.default_model not in self.engines:
            raise InvalidInputError(f"default_model {self.default_model!r} is not one of the engines "
                                    f"{sorted(self.engines)}")
        self._embed = embed or (lambda model, engine, query: engine.embed([query.encoded])[0])
        self._positions = {name: {image_id: i for i, image_id in enumerate(engine.collection.ids)}
                           for name, engine in self.engines.items()}
        self._system_random = random.SystemRandom()

    def engine(self, model: str | None = None) -> tuple[str, RetrievalEngine]:
        """(name, engine) of `model` (None: the default model).

        Raises:
          MissingError: an unknown model.
        """
        if model is None or model == "":  # absent, or an empty form field
            model = self.default_model
        if not isinstance(model, str) or model not in self.engines:
            raise MissingError(f"unknown model {model!r}; available models: {', '.join(self.engines)}")
        return model, self.engines[model]

    def locate(self, image_id: str, model: str | None = None, what: str = "id") -> tuple[str, int]:
        """(model, position) of a database image: in `model`'s collection, or else the first collection holding it.

        Raises:
          InvalidInputError: `image_id` is not a non-empty string of at most MAX_ID_LENGTH characters.
          MissingError: an unknown model, or no collection holds the image.
        """
        _checked_id(image_id, what)
        first = [] if model is None or model == "" else [self.engine(model)[0]]
        for name in first + [name for name in self.engines if name not in first]:
            position = self._positions[name].get(image_id)
            if position is not None:
                return name, position
        raise MissingError(f"unknown image id {image_id[:200]!r}: no collection holds it (models "
                           f"{', '.join(self.engines)})")

    def random_id(self, model: str | None = None, seed: int | None = None) -> str:
        """A random database image id of `model`'s collection (`seed`: the same one every time)."""
        name, engine = self.engine(model)
        collection = engine.collection
        if not len(collection):
            raise MissingError(f"the collection of model {name!r} is empty: add images with `tfr index --add`")
        rng = self._system_random if seed is None else random.Random(seed)
        return collection.ids[rng.randrange(len(collection))]

    def search(self, query: Query, model: str | None = None, *, k: int = 10, threshold: float | None = None,
               classes: Sequence[str | int] | str | None = None) -> Answer:
        """`model`'s top-k answer to `query`: embeds the image (or looks up the database image), applies the
        favourites' feedback, then the filters (threshold on the score, classes by name or label).

        Raises:
          InvalidInputError, MissingError: unknown classes, images or model; feedback that cannot be computed.
        """
        model, engine = self.engine(model)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        labels = class_labels(engine.collection.class_names, classes)
        vector, exclude = None, set()
        if query.image is not None:
            vector = self._embed(model, engine, query)
        elif query.id is not None:
            vector, position = self._database_vector(model, engine, query.id, "id")
            exclude.add(position)
        if query.positives:
            favourites = [self._database_vector(model, engine, image_id, "positives") for image_id in query.positives]
            vector = rocchio(vector, np.stack([v for v, _ in favourites]), query.alpha, query.beta)
            exclude.update(position for _, position in favourites)
        if query.image is not None or None in exclude:  # an image was embedded
            timings["embed_ms"] = (time.perf_counter() - start) * 1000
        exclude.discard(None)
        start = time.perf_counter()
        results = engine.search(vector[None, :], k, threshold=threshold, classes=labels, exclude=sorted(exclude))[0]
        timings["search_ms"] = (time.perf_counter() - start) * 1000
        return Answer(model, results, None if labels is None else [engine.collection.class_names[c] for c in labels],
                      timings)

    def _database_vector(self, model: str, engine: RetrievalEngine, image_id: str,
                         what: str) -> tuple[np.ndarray, int | None]:
        """(vector, position) of a database image for `model`: its stored vector, or, when only another model's
        collection holds the image (bundles over different image sets), its pixels embedded by `model` (position
        None)."""
        holder, position = self.locate(image_id, model, what)
        if holder == model:
            return engine.vectors([position])[0], position
        image = Query.from_bytes(self.engines[holder].collection.read_bytes(position), name=image_id[:200])
        return self._embed(model, engine, image), None

    def compare(self, query: Query, *, classes: Sequence[str | int] | str | None = None,
                **filters) -> dict[str, Answer]:
        """Side by side: every model's answer to the same query, {model: answer} in the engines' order (`filters` as in
        `search`). Bundles may differ in their classes: each model filters by those of `classes` it knows, and a
        model that knows none of them answers nothing.

        Raises:
          InvalidInputError: a class that no model knows (and the errors of `search`).
        """
        every_name = list(dict.fromkeys(name for engine in self.engines.values()
                                        for name in engine.collection.class_names))
        values = _class_values(classes, every_name)
        known = {model: [value for value in values if _label_of(engine.collection.class_names, value) is not None]
                 for model, engine in self.engines.items()}
        for value in values:
            if not any(value in model_values for model_values in known.values()):
                raise InvalidInputError(f"unknown class {str(value)[:100]!r} in classes; known classes: "
                                        f"{', '.join(every_name)}")
        return {model: (self.search(query, model, classes=known[model], **filters) if known[model] or not values
                        else Answer(model, [], [], {}))
                for model in self.engines}
