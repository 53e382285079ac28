"""Dynamic batching (`features.batching`): concurrent one-image requests share model calls and get their own vectors."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tf_retrieval.features.batching import EmbeddingBatcher


class GatedEmbedder:
    """Embeds pixels as their mean colour; each call waits for `gate`, so requests pile up behind a running call."""

    image_size = 8

    def __init__(self):
        self.batch_sizes = []
        self.gate = threading.Event()

    def embed_pixels(self, pixels):
        self.batch_sizes.append(len(pixels))
        self.gate.wait(10)
        if np.any(pixels == 13):
            raise RuntimeError("unlucky pixels")
        return pixels.reshape(len(pixels), -1, 3).mean(axis=1)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_requests_queued_behind_a_model_call_share_the_next_one():
    embedder = GatedEmbedder()
    batcher = EmbeddingBatcher(embedder, max_batch=4)
    images = [np.full((5 + i, 7, 3), 10 * i, np.uint8) for i in range(6)]
    vectors = {}

    def request(i):
        vectors[i] = batcher.embed(images[i])

    threads = [threading.Thread(target=request, args=(0,))]
    threads[0].start()
    wait_until(lambda: embedder.batch_sizes == [1])  # the first call runs (held at the gate)
    threads += [threading.Thread(target=request, args=(i,)) for i in range(1, 6)]
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: batcher._queue.qsize() == 5)
    embedder.gate.set()
    for thread in threads:
        thread.join(10)
    assert embedder.batch_sizes == [1, 4, 1]  # at most max_batch per call
    assert (batcher.batches, batcher.images) == (3, 6)
    for i in range(6):
        np.testing.assert_allclose(vectors[i], [10 * i] * 3, atol=1e-4)
    batcher.close()


def test_a_failed_model_call_fails_its_requests_only():
    embedder = GatedEmbedder()
    embedder.gate.set()
    batcher = EmbeddingBatcher(embedder)
    with pytest.raises(RuntimeError, match="unlucky pixels"):
        batcher.embed(np.full((8, 8, 3), 13, np.uint8))
    np.testing.assert_allclose(batcher.embed(np.full((8, 8, 3), 20, np.uint8)), [20] * 3, atol=1e-4)
    batcher.close()
    assert not any(worker.is_alive() for worker in batcher._workers)
    with pytest.raises(RuntimeError, match="the embedding batcher is closed"):  # instead of waiting for good
        batcher.embed(np.full((8, 8, 3), 20, np.uint8))


def test_an_embedder_answering_too_few_vectors_fails_the_batch_clearly():
    embedder = GatedEmbedder()
    embedder.gate.set()
    embedder.embed_pixels = lambda pixels: np.zeros((0, 3), np.float32)
    batcher = EmbeddingBatcher(embedder)
    with pytest.raises(RuntimeError, match="answered 0 vectors for 1 images"):
        batcher.embed(np.full((8, 8, 3), 20, np.uint8))
    batcher.close()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch and workers must be >= 1"):
        EmbeddingBatcher(GatedEmbedder(), max_batch=0)
    assert EmbeddingBatcher.supports(GatedEmbedder()) and not EmbeddingBatcher.supports(object())
