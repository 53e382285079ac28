"""The fast CPU runtime: the embedding model converted to a LiteRT (TFLite) flatbuffer, run by LiteRT's interpreter.

On a CPU, LiteRT with its default XNNPACK kernels runs EfficientNet-Lite0 several times faster than TensorFlow
(`benchmarks/throughput.py`). The flatbuffer is the keras model of `features.embedding.build_model` (pixels in,
unit-length embeddings or +-1 codes out), traced as a concrete function whose variables are frozen into constants,
converted, and cached on disk per model id. (Unfrozen, the concrete function converts to NaNs: its variables are
resource variables; `TFLiteConverter.from_keras_model` converts correctly, through a SavedModel, but takes 3-4 times
longer: 15-20 s against 5 s for EfficientNet-Lite0 on 2 cores.)

The interpreter comes from `ai-edge-litert`, LiteRT's own package, when it is installed (the `litert` extra), else from
TensorFlow (`tf.lite.Interpreter`, deprecated in favour of LiteRT but the same kernels).

The runtime "litert-fp16" runs the same float32 flatbuffer with XNNPACK's float16 arithmetic (its FORCE_FP16 flag,
through LiteRT's `CompiledModel` API, which `ai-edge-litert` has and `tf.lite` lacks). On a CPU with float16
arithmetic (x86 AVX512-FP16, from Intel Sapphire Rapids on; ARMv8.2) it is about 1.6 times faster; its embeddings
are within float16 rounding of float32's (cosine 0.9998 on average; retrieval mAP equal to 3 decimals,
`benchmarks/results/throughput.md`). Where it cannot run, float32 LiteRT runs instead.
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np

from tf_retrieval.errors import InvalidInputError

logger = logging.getLogger(__name__)

#: The in-process runtimes: LiteRT in float32 (fast on CPUs; Keras' outputs), LiteRT in float16 arithmetic (faster on
#: CPUs that have it) and TensorFlow (`tf.function`).
RUNTIMES = ("litert", "litert-fp16", "tf")
#: The arithmetic of each LiteRT runtime.
LITERT_PRECISIONS = {"litert": "fp32", "litert-fp16": "fp16"}
#: XNNPACK's delegate flags (tensorflow/lite/delegates/xnnpack/xnnpack_delegate.h): its default quantised kernels
#: (QS8 | QU8), plus FORCE_FP16 for float16 arithmetic.
XNNPACK_DEFAULT_FLAGS, XNNPACK_FORCE_FP16 = 0x1 | 0x2, 0x4


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


def cached_litert(model_id: str, build_model, cache_dir: str, precision: str = "fp32") -> tuple[LiteRTModel, str]:
    """`load_litert` of the model `model_id` from `<cache_dir>/<model_id>.tflite`, converted from `build_model()` and
    written there on first use; a cached file that does not load (damaged) is converted and written again."""
    from tf_retrieval.storage import safe_name

    path = os.path.join(cache_dir, safe_name(model_id) + ".tflite")
    try:
        with open(path, "rb") as f:
            flatbuffer = f.read()
    except FileNotFoundError:
        return load_litert(_convert_and_cache(model_id, build_model, path), precision)
    try:
        return load_litert(flatbuffer, precision)
    except Exception as exc:  # noqa: BLE001 - whatever the interpreter says of a damaged file
        logger.warning("cached LiteRT model %s does not load (%s): converting it again", path, exc)
        return load_litert(_convert_and_cache(model_id, build_model, path), precision)


def _convert_and_cache(model_id: str, build_model, path: str) -> bytes:
    """`convert(build_model())`, also written to `path` (where it can be)."""
    from tf_retrieval.storage import atomic_write

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

    With "litert" (or "litert-fp16") the model is converted (and cached as `<cache_dir>/<cache_key>.tflite` when both
    are given, so a second call needs neither the conversion nor, once cached, the keras model); float16 arithmetic
    that cannot run falls back to float32 LiteRT, and a model LiteRT cannot convert or run to TensorFlow, each with a
    warning. With "tf" it runs in a `tf.function`.

    Args:
      build_model: returns the keras model (called only when it is needed).
      runtime: one of `RUNTIMES`.
      cache_key: names the model and everything that changes its weights (a cache file name).
      cache_dir: where converted models are cached.
    """
    if runtime not in RUNTIMES:
        raise InvalidInputError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime in LITERT_PRECISIONS:
        try:
            if cache_key and cache_dir:
                model, precision = cached_litert(cache_key, build_model, cache_dir, LITERT_PRECISIONS[runtime])
            else:
                model, precision = load_litert(convert(build_model()), LITERT_PRECISIONS[runtime])
            return model, {value: name for name, value in LITERT_PRECISIONS.items()}[precision]
        except Exception as exc:  # noqa: BLE001 - any converter or interpreter failure: TensorFlow still runs it
            logger.warning("model %s does not run on LiteRT (%s: %s); using TensorFlow", cache_key or "(uncached)",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    import tensorflow as tf

    keras_model = build_model()  # built here, eagerly: weights loaded inside a tf.function trace are lost
    tf_forward = tf.function(lambda images: keras_model(images, training=False), reduce_retracing=True)
    return (lambda pixels: tf_forward(pixels).numpy()), "tf"


def load_litert(flatbuffer: bytes, precision: str = "fp32") -> tuple[LiteRTModel, str]:
    """(`LiteRTModel(flatbuffer, precision=precision)`, its precision); where float16 arithmetic cannot run, float32
    (with a warning)."""
    if precision == "fp16":
        try:
            return LiteRTModel(flatbuffer, precision="fp16"), "fp16"
        except Exception as exc:  # noqa: BLE001 - no float16 kernels here: float32 LiteRT runs the model
            logger.warning("float16 LiteRT cannot run here (%s: %s); using float32 LiteRT", type(exc).__name__,
                           str(exc).splitlines()[0] if str(exc) else "")
    return LiteRTModel(flatbuffer), "fp32"


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

    An interpreter must only be used by one call at a time, so calls made at the same time get one each, up to
    `MAX_RUNNERS` (more wait for one: each runs `num_threads` kernel threads, and a REST server may run 64 calls at
    once); they are kept between calls and reused (a server that starts a thread per connection does not build one per
    request); each one's input is resized to the batch it is given, without converting again.

    Args:
      flatbuffer: the model (`convert`).
      num_threads: kernel threads per interpreter; default: `$TFR_LITERT_THREADS`, else the machine's cores.
      precision: "fp32" (`Interpreter`), or "fp16": XNNPACK's float16 arithmetic (LiteRT's `CompiledModel`, from
        `ai-edge-litert`; raises here when it is missing or cannot run the model).
    """

    #: The most interpreters built (each holds its tensors and `num_threads` kernel threads), all kept between calls.
    MAX_RUNNERS = 8

    def __init__(self, flatbuffer: bytes, num_threads: int | None = None, precision: str = "fp32"):
        if precision not in ("fp32", "fp16"):
            raise InvalidInputError(f"unknown LiteRT precision {precision!r}; choose fp32 or fp16")
        self.flatbuffer, self.precision = flatbuffer, precision
        self.num_threads = num_threads or int(os.environ.get("TFR_LITERT_THREADS") or 0) or os.cpu_count() or 1
        self._idle = [self._new_runner()]  # built here, so a model that cannot run fails now, not on a request
        self._idle_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.MAX_RUNNERS)  # a call holds one while it runs
        self.input_shape = self._idle[0].input_shape
        self.runners = 1  # interpreters built so far

    def _new_runner(self):
        make = _CompiledModelRunner if self.precision == "fp16" else _InterpreterRunner
        return make(self.flatbuffer, self.num_threads)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if tuple(pixels.shape[1:]) != tuple(self.input_shape[1:]):
            raise InvalidInputError(f"expected pixels of shape [n, {', '.join(map(str, self.input_shape[1:]))}], "
                                    f"got {list(pixels.shape)}")
        with self._slots:
            with self._idle_lock:
                runner = self._idle.pop() if self._idle else None
            if runner is None:  # every one built is busy, and fewer than MAX_RUNNERS are built
                runner = self._new_runner()
                with self._idle_lock:
                    self.runners += 1
            try:
                return runner(pixels)
            finally:
                with self._idle_lock:
                    self._idle.append(runner)


class _InterpreterRunner:
    """An `Interpreter` (float32) for one call at a time, resized to each new batch size."""

    def __init__(self, flatbuffer: bytes, num_threads: int):
        self.interpreter = interpreter_class()(model_content=flatbuffer, num_threads=num_threads)
        self.interpreter.allocate_tensors()
        (source,), (target,) = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        self.input_shape = tuple(int(d) for d in source["shape_signature"])
        self.input_index, self.output_index, self.batch = source["index"], target["index"], None

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self.batch != len(pixels):
            self.interpreter.resize_tensor_input(self.input_index, list(pixels.shape), strict=False)
            self.interpreter.allocate_tensors()
            self.batch = len(pixels)
        self.interpreter.set_tensor(self.input_index, pixels)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_index).copy()


class _CompiledModelRunner:
    """A LiteRT `CompiledModel` in XNNPACK's float16 arithmetic for one call at a time, resized to each new batch
    size."""

    def __init__(self, flatbuffer: bytes, num_threads: int):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.options import Options

        options = Options(cpu_options=CpuOptions(num_threads=num_threads,
                                                 xnnpack_flags=XNNPACK_DEFAULT_FLAGS | XNNPACK_FORCE_FP16))
        self.model = CompiledModel.from_buffer(flatbuffer, environment=_litert_environment(), options=options)
        self.signature = next(iter(self.model.get_signature_list()))
        (source,) = self.model.get_input_tensor_details(self.signature).values()
        self.input_shape = (-1, *source["shape"][1:])
        self.batch = None
        self(np.zeros((1, *self.input_shape[1:]), np.float32))  # XNNPACK refuses float16 on its first run, if at all

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self.batch != len(pixels):
            self.model.resize_input_tensor(0, list(pixels.shape), strict=False)
            self.inputs, self.outputs = self.model.create_input_buffers(0), self.model.create_output_buffers(0)
            (target,) = self.model.get_output_tensor_details(self.signature).values()
            self.output_shape, self.batch = tuple(target["shape"]), len(pixels)
        self.inputs[0].write(pixels)
        self.model.run_by_index(0, self.inputs, self.outputs)
        return self.outputs[0].read(int(np.prod(self.output_shape)), np.float32).reshape(self.output_shape)


_environment = None
_environment_lock = threading.Lock()


def _litert_environment():
    """The process's one LiteRT `Environment` (shared by every `CompiledModel`: it is set up, and its vendor plugins
    looked for, once)."""
    global _environment
    with _environment_lock:
        if _environment is None:
            import ai_edge_litert
            from ai_edge_litert.environment import Environment, EnvironmentOptions

            runtime = os.path.dirname(os.path.abspath(ai_edge_litert.__file__))  # where its libLiteRt.so lies
            _environment = Environment.create(options=EnvironmentOptions(runtime_path=runtime))
        return _environment
