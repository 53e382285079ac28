"""Stage 5, training: triplet losses (`losses`) and fine-tuning on cached backbone outputs (`train`)."""
