"""Dynamic batching: one-image embedding requests from many threads, embedded together (like TF Serving's batcher)."""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from tf_retrieval.data.images import resize_and_crop_array


class EmbeddingBatcher:
    """Embeds images handed over by many threads in shared model calls.

    Request threads resize their decoded image (`data.images.resize_and_crop_array`: the pixels of indexing's
    `resize_and_crop`, in numpy, no TensorFlow op per request) and queue it; a worker thread takes everything queued
    (up to `max_batch`, waiting at most `max_wait_ms` for more) and embeds it in one model call. Under load the model
    then runs on batches instead of one image at a time, which costs far less per image; a lone request waits for
    nothing.

    Args:
      embedder: an in-process embedder with `image_size` and `embed_pixels` (`features.embedding.Embedder`).
      max_batch: most images per model call.
      max_wait_ms: how long a worker waits for more images once it has one (0: take only what is already queued).
      workers: model calls that may run at the same time (each on its own batch).
    """

    def __init__(self, embedder, max_batch: int = 32, max_wait_ms: float = 0.0, workers: int = 1):
        if max_batch < 1 or max_wait_ms < 0 or workers < 1:
            raise ValueError(f"max_batch and workers must be >= 1 and max_wait_ms >= 0, got {max_batch}, {workers} and "
                             f"{max_wait_ms}")
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.image_size = int(embedder.image_size)
        self._queue: queue.Queue = queue.Queue()
        self.batches = 0  # model calls made, and images embedded (for stats; several workers count them)
        self.images = 0
        self._count_lock = threading.Lock()  # the counters, and `_closed` with the queue's stops
        self._closed = False
        self._workers = [threading.Thread(target=self._run, name=f"embedding-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for worker in self._workers:
            worker.start()

    @staticmethod
    def supports(embedder) -> bool:
        """Whether `embedder` runs in this process (has `image_size` and `embed_pixels`): its calls can be batched."""
        return hasattr(embedder, "embed_pixels") and hasattr(embedder, "image_size")

    def embed(self, image: np.ndarray) -> np.ndarray:
        """One decoded RGB uint8 image [h, w, 3] -> its embedding [d] (blocks until its batch is done)."""
        job = {"pixels": resize_and_crop_array(image, self.image_size), "done": threading.Event()}
        with self._count_lock:  # not after close()'s stops, where no worker would take it
            if self._closed:
                raise RuntimeError("the embedding batcher is closed")
            self._queue.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["vector"]

    def close(self) -> None:
        """Stops the worker threads (queued jobs are finished first); `embed` raises from then on."""
        with self._count_lock:
            self._closed = True
            for _ in self._workers:
                self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, stop = self._gather(job)
            try:
                vectors = self.embedder.embed_pixels(np.stack([j["pixels"] for j in batch]))
                if len(vectors) != len(batch):
                    raise RuntimeError(f"the embedder answered {len(vectors)} vectors for {len(batch)} images")
                for j, vector in zip(batch, vectors):
                    j["vector"] = vector
            except Exception as exc:  # handed to every waiting request thread, which raises it
                for j in batch:
                    j["error"] = exc
            finally:
                with self._count_lock:
                    self.batches += 1
                    self.images += len(batch)
                for j in batch:
                    j["done"].set()
            if stop:
                return

    def _gather(self, first: dict) -> tuple[list[dict], bool]:
        """`first` plus what else is queued (up to max_batch, waiting up to max_wait); True when a stop came too."""
        batch = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                remaining = deadline - time.perf_counter()
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False
