"""The package as users get it: the wheel, installed (not editable) into a fresh virtualenv; and the Makefile."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "tf_retrieval", "serving", "web",
           "tuning")

# Run in the fresh virtualenv: the page app over a tiny in-memory engine, from the installed package's files.
WEB_CHECK = """
import io, json, sys
import numpy as np
from PIL import Image
from tf_retrieval.config import ModelConfig
from tf_retrieval.data.images import ImageCollection
from tf_retrieval.search.engine import RetrievalEngine
from tf_retrieval.search.index import build_index
from tf_retrieval.web import app as web

def png(value):
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(out, format="PNG")
    return out.getvalue()

collection = ImageCollection("tiny", ids=["a", "b"], labels=np.array([0, 1]), class_names=["x", "y"],
                             splits=np.array(["all", "all"]), encoded=[png(0), png(255)])
index = build_index(np.eye(2, dtype=np.float32), metric="cosine", backend="exact")
config = ModelConfig(name="baseline", backbone="mobilenet_v2", image_size=32, weights=None)
client = web.create_app({"baseline": RetrievalEngine(config, collection, index)}, reload_seconds=0).test_client()
pages = {path: client.get(path) for path in ("/", "/api/openapi.json", "/static/app.js", "/static/style.css")}
print(json.dumps({"module": web.__file__, "status": {p: r.status_code for p, r in pages.items()},
                  "openapi": pages["/api/openapi.json"].get_json()["openapi"]}))
"""


def run(command, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    missing = [name for name in ("pip", "setuptools", "wheel") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"cannot build a wheel offline: {', '.join(missing)} not installed in {sys.prefix}")
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif os.path.exists(path):
            os.makedirs(source, exist_ok=True)
            shutil.copy(path, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(root / "dist"), "."], cwd=source)
    (path,) = (root / "dist").glob("tf_retrieval-*.whl")
    return path


def test_wheel_holds_the_page_files_and_no_generic_top_level_packages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"tf_retrieval"}  # no top-level web, serving or tuning
    for name in ("web/openapi.json", "web/templates/index.html", "web/static/app.js", "web/static/style.css",
                 "serving/__main__.py", "tuning/tune.py", "py.typed", "recipes/cifar10-2.json"):
        assert f"tf_retrieval/{name}" in names


def test_installed_wheel_runs_the_cli_the_page_and_serving(wheel, tmp_path):
    """Installed with --no-deps into a fresh virtualenv; the pinned stack comes from this environment through a .pth
    file added after the install (so pip neither sees nor touches this environment's editable tf_retrieval)."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = str(venv / "bin" / "python")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", "--no-deps", str(wheel)],
        cwd=tmp_path)
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip()
    stack = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    with open(os.path.join(site, "_stack.pth"), "w") as f:
        f.write("\n".join(stack) + "\n")

    assert "usage: tfr" in run([str(venv / "bin" / "tfr"), "--help"], cwd=tmp_path)
    assert "usage:" in run([python, "-m", "tf_retrieval.serving", "--help"], cwd=tmp_path)
    page = json.loads(run([python, "-c", WEB_CHECK], cwd=tmp_path).strip().splitlines()[-1])
    assert page["module"].startswith(site)  # the installed copy, not the checkout
    assert set(page["status"].values()) == {200} and page["openapi"].startswith("3.")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("shared", [False, True])
def test_makefile_exports_tfds_data_dir_only_when_the_shared_copy_exists(tmp_path, shared):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(os.path.join(REPO, "Makefile"), checkout / "Makefile")
    data = tmp_path / "shared" / "data" / "tensorflow_datasets"
    if shared:
        data.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("TFDS_DATA_DIR", "MAKEFLAGS")}
    result = subprocess.run(["make", "-s", "--eval", "show-tfds: ; @echo \"[$${TFDS_DATA_DIR-unset}]\"", "show-tfds"],
                            cwd=checkout, env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == (f"[{data}]" if shared else "[unset]")


def test_the_dataflow_requirements_are_pinned_as_the_beam_environment_is():
    def pins(name):
        with open(os.path.join(REPO, name)) as f:
            return {line.split("==")[0].lower(): line.strip() for line in f if "==" in line and not line.startswith("#")}

    dataflow, beam = pins("requirements-dataflow.txt"), pins("constraints-beam.txt")
    assert dataflow and all(beam.get(name) == pin for name, pin in dataflow.items()), (dataflow, beam)
