"""Stage 6, evaluation: retrieval metrics (`metrics`), protocol scoring (`evaluate`), baseline vs fine-tuned (`compare`)."""
