"""Process set-up: what must happen before TensorFlow is imported (entry points call `quiet_tensorflow()` first), and
numpy's BLAS threads."""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading


def has_nvidia_driver() -> bool:
    """Whether this machine has an NVIDIA driver (the kernel module or `nvidia-smi`)."""
    return os.path.exists("/proc/driver/nvidia") or shutil.which("nvidia-smi") is not None


def quiet_tensorflow() -> None:
    """Sets TensorFlow's C++ log level, unless `TF_CPP_MIN_LOG_LEVEL` is already set: 2 (errors only) with an NVIDIA
    driver, 3 without one, where TensorFlow's only error line is the harmless "failed call to cuInit ... (303)" (hiding
    CUDA devices does not stop that call). Has no effect once TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if has_nvidia_driver() else "3")


def single_threaded_blas() -> None:
    """Limits numpy's BLAS to one thread in this process, for good.

    A server handles many small requests at once, each with a few tiny matrix products (the query resize, vector
    finishing): BLAS threads there only wake up to contend with the request threads and the model's own kernel
    threads. Measured on 2 cores (`tfr web`, concurrency 8): 67 -> 102 req/s with this limit.
    """
    _blas_controller().limit(limits=1)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's controller of numpy's BLAS (numpy imported first: the controller sees only loaded libraries)."""
    import importlib

    from threadpoolctl import ThreadpoolController

    importlib.import_module("numpy")
    return ThreadpoolController().select(user_api="blas")


class _OneBlasThread:
    """The process-wide state of `one_blas_thread`: how many blocks are inside, and the limit they share."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inside = 0
        self.limiter = None

    @contextlib.contextmanager
    def __call__(self):
        with self.lock:
            if self.inside == 0:
                self.limiter = _blas_controller().limit(limits=1)
            self.inside += 1
        try:
            yield
        finally:
            with self.lock:
                self.inside -= 1
                if self.inside == 0:
                    self.limiter.restore_original_limits()


#: `with one_blas_thread():` runs the block with numpy's BLAS on one thread, then gives it back its threads.
#:
#: For many small matrix products, such as resizing images (`data.images.resize_and_crop_images`): BLAS's threads only
#: contend there with the caller's own (a decoding pool; LiteRT's or TensorFlow's kernel threads, which spin for a
#: while after each model call). On 2 cores, decoding and resizing 32 CIFAR images to 160 px before a LiteRT call took
#: 57 ms with 2 BLAS threads and 9 ms with one. The limit is process-wide (BLAS has no per-thread setting): concurrent
#: blocks share it, and the last one to leave lifts it.
one_blas_thread = _OneBlasThread()
