"""Stage 1, data: decoding and resizing images (`images`), collections from tfds or folders, evaluation protocols."""
