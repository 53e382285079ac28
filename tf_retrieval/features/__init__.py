"""Stage 3, features: a model config turned into vectors (`embedding`), with backbone outputs cached on disk (`cache`)
and concurrent one-image requests embedded together (`batching`)."""
