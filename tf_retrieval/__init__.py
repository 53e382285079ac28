"""tf_retrieval: content-based image retrieval.

Data flow (one direction): images -> `data` (decode, resize) -> `backbones` (frozen ImageNet features, cached by
`features`) -> embedding head -> `index` (exact or ScaNN) -> `metrics` / `evaluate`. `serving/`, `web/` and
`tuning/` build on this package; it imports none of them.
"""
__version__ = "0.1.0"
