"""Process set-up that must happen before TensorFlow is imported (entry points call `quiet_tensorflow()` first)."""
from __future__ import annotations

import os
import shutil


def has_nvidia_driver() -> bool:
    """Whether this machine has an NVIDIA driver (the kernel module or `nvidia-smi`)."""
    return os.path.exists("/proc/driver/nvidia") or shutil.which("nvidia-smi") is not None


def quiet_tensorflow() -> None:
    """Sets TensorFlow's C++ log level, unless `TF_CPP_MIN_LOG_LEVEL` is already set: 2 (errors only) with an NVIDIA
    driver, 3 without one, where TensorFlow's only error line is the harmless "failed call to cuInit ... (303)" (hiding
    CUDA devices does not stop that call). Has no effect once TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if has_nvidia_driver() else "3")


def single_threaded_blas() -> None:
    """Limits numpy's BLAS to one thread in this process (via `threadpoolctl`, when installed).

    A server handles many small requests at once, each with a few tiny matrix products (the query resize, vector
    finishing): BLAS threads there only wake up to contend with the request threads and the model's own kernel
    threads. Measured on 2 cores (`tfr web`, concurrency 8): 67 -> 102 req/s with this limit.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=1, user_api="blas")
