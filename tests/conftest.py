"""Shared test setup: CPU only, quiet TensorFlow, seeded randomness, no network."""
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def default_workdir(tmp_path_factory):
    """Artefacts written to the default work directory (e.g. cached LiteRT models) go to a temp folder, not the checkout."""
    previous = os.environ.get("TFR_WORKDIR")
    os.environ["TFR_WORKDIR"] = str(tmp_path_factory.mktemp("workdir"))
    yield os.environ["TFR_WORKDIR"]
    if previous is None:
        os.environ.pop("TFR_WORKDIR", None)
    else:
        os.environ["TFR_WORKDIR"] = previous


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def make_image_folder(root, classes=("red", "green", "blue"), per_class=6, size=(40, 48), seed=0):
    """Writes `per_class` PNG images per colour class under root/<class>/ and returns root.

    Each class is a noisy solid colour, so a colour-sensitive embedding separates them.
    """
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
               "purple": (140, 30, 160), "grey": (128, 128, 128)}
    rng = np.random.default_rng(seed)
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colours[name]) + rng.normal(0, 12, size + (3,)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f"{name}_{i:03d}.png"))
    return str(root)


@pytest.fixture
def image_dir(tmp_path):
    """A small folder of 3 colour classes x 6 PNG images."""
    return make_image_folder(tmp_path / "images")
