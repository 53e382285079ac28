"""tf_retrieval: content-based image retrieval.

One package per stage, data flowing one way: `data` (decode, resize, tfds protocols) -> `models` (frozen backbones,
heads) -> `features` (config -> finished vectors, with the feature cache) -> `search` (exact / ScaNN / Hamming index,
bundles, queries) -> `evaluation` (metrics, protocol scores, comparisons). `training` fits the heads. `serving`, `web`
and `tuning` (installed as `tf_retrieval.serving`, `.web`, `.tuning`) build on the stages; the stages import none of them.
"""
__version__ = "0.1.0"
