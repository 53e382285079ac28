"""The fast CPU runtime: the embedding model converted to a LiteRT (TFLite) flatbuffer, run by LiteRT's interpreter.

On a CPU, LiteRT with its default XNNPACK kernels runs EfficientNet-Lite0 several times faster than TensorFlow
(`benchmarks/throughput.py`). The flatbuffer is the keras model of `features.embedding.build_model` (pixels in,
unit-length embeddings or +-1 codes out), traced as a concrete function whose variables are frozen into constants,
converted, and cached on disk per model id. (Unfrozen, the concrete function converts to NaNs: its variables are
resource variables; `TFLiteConverter.from_keras_model` converts correctly, through a SavedModel, but takes 3-4 times
longer: 15-20 s against 5 s for EfficientNet-Lite0 on 2 cores.)

The interpreter comes from `ai-edge-litert`, LiteRT's own package, when it is installed (the `litert` extra), else from
TensorFlow (`tf.lite.Interpreter`, deprecated in favour of LiteRT but the same kernels).
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np

from tf_retrieval.errors import InvalidInputError

logger = logging.getLogger(__name__)

#: The in-process runtimes: LiteRT (fast on CPUs) and TensorFlow (`tf.function`).
RUNTIMES = ("litert", "tf")


def convert(model) -> bytes:
    """The LiteRT flatbuffer of a one-input keras model (float32 weights and arithmetic: outputs equal the keras
    model's), with a free batch dimension."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    source = model.inputs[0]
    forward = tf.function(lambda inputs: model(inputs, training=False),
                          input_signature=[tf.TensorSpec([None, *source.shape[1:]], source.dtype)])
    frozen = convert_variables_to_constants_v2(forward.get_concrete_function())
    return tf.lite.TFLiteConverter.from_concrete_functions([frozen]).convert()


def cached_flatbuffer(model_id: str, build_model, cache_dir: str) -> bytes:
    """The flatbuffer of the model `model_id` from `<cache_dir>/<model_id>.tflite`, converted from `build_model()`
    and written there on first use."""
    from tf_retrieval.storage import atomic_write, safe_name

    path = os.path.join(cache_dir, safe_name(model_id) + ".tflite")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        pass
    flatbuffer = convert(build_model())
    try:
        with atomic_write(path, "wb", encoding=None) as f:
            f.write(flatbuffer)
        logger.info("LiteRT model %s: %.1f MB at %s", model_id, len(flatbuffer) / 1e6, path)
    except OSError as exc:  # a read-only work directory: convert again next time
        logger.warning("could not cache the LiteRT model at %s: %s", path, exc)
    return flatbuffer


def compile_model(build_model, *, runtime: str = "litert", cache_key: str | None = None,
                  cache_dir: str | None = None):
    """A keras model as a callable on numpy pixels, in the chosen runtime: `(forward, runtime actually used)`.

    With "litert" the model is converted (and cached as `<cache_dir>/<cache_key>.tflite` when both are given, so a
    second call needs neither the conversion nor, once cached, the keras model); a model LiteRT cannot convert or run
    falls back to TensorFlow with a warning. With "tf" it runs in a `tf.function`.

    Args:
      build_model: returns the keras model (called only when it is needed).
      runtime: one of `RUNTIMES`.
      cache_key: names the model and everything that changes its weights (a cache file name).
      cache_dir: where converted models are cached.
    """
    if runtime not in RUNTIMES:
        raise InvalidInputError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "litert":
        try:
            if cache_key and cache_dir:
                flatbuffer = cached_flatbuffer(cache_key, build_model, cache_dir)
            else:
                flatbuffer = convert(build_model())
            return LiteRTModel(flatbuffer), "litert"
        except Exception as exc:  # noqa: BLE001 - any converter or interpreter failure: TensorFlow still runs it
            logger.warning("model %s does not run on LiteRT (%s: %s); using TensorFlow", cache_key or "(uncached)",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    import tensorflow as tf

    keras_model = build_model()  # built here, eagerly: weights loaded inside a tf.function trace are lost
    tf_forward = tf.function(lambda images: keras_model(images, training=False), reduce_retracing=True)
    return (lambda pixels: tf_forward(pixels).numpy()), "tf"


def interpreter_class():
    """LiteRT's `Interpreter` (package `ai-edge-litert`), else TensorFlow's `tf.lite.Interpreter`."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


class LiteRTModel:
    """Calls a one-input, one-output flatbuffer like a model: `model(pixels) -> outputs`.

    An interpreter must only be used by one thread at a time, so each calling thread gets its own (created on its
    first call); its input is resized to the batch it is given, without converting again.

    Args:
      flatbuffer: the model (`convert`).
      num_threads: kernel threads per interpreter; default: `$TFR_LITERT_THREADS`, else the machine's cores.
    """

    def __init__(self, flatbuffer: bytes, num_threads: int | None = None):
        self.flatbuffer = flatbuffer
        self.num_threads = num_threads or int(os.environ.get("TFR_LITERT_THREADS") or 0) or os.cpu_count() or 1
        self._local = threading.local()
        first = self._interpreter()  # fail here, not on the first request, when the flatbuffer is unusable
        (source,), (target,) = first.get_input_details(), first.get_output_details()
        self.input_shape = tuple(int(d) for d in source["shape_signature"])
        self._input_index, self._output_index = source["index"], target["index"]  # the same in every interpreter

    def _interpreter(self):
        interpreter = getattr(self._local, "interpreter", None)
        if interpreter is None:
            interpreter = interpreter_class()(model_content=self.flatbuffer, num_threads=self.num_threads)
            interpreter.allocate_tensors()
            self._local.interpreter, self._local.batch = interpreter, None
        return interpreter

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        interpreter = self._interpreter()
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if tuple(pixels.shape[1:]) != tuple(self.input_shape[1:]):
            raise InvalidInputError(f"expected pixels of shape [n, {', '.join(map(str, self.input_shape[1:]))}], "
                                    f"got {list(pixels.shape)}")
        if self._local.batch != len(pixels):
            interpreter.resize_tensor_input(self._input_index, list(pixels.shape), strict=False)
            interpreter.allocate_tensors()
            self._local.batch = len(pixels)
        interpreter.set_tensor(self._input_index, pixels)
        interpreter.invoke()
        return interpreter.get_tensor(self._output_index).copy()
