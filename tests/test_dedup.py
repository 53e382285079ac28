import io
import json
import os

import numpy as np
import pytest

from tf_retrieval.cli import main
from tf_retrieval.config import ModelConfig
from tf_retrieval.data.images import image_folder
from tf_retrieval.search.dedup import connected_groups, duplicate_pairs, find_duplicates
from tf_retrieval.search.engine import RetrievalEngine, build_bundle, delete_images
from tf_retrieval.search.index import build_index


class ThumbnailEmbedder:
    """A transparent embedder for tests: the 8x8 RGB thumbnail, mean-centred and L2-normalised (a perceptual-hash-like
    vector: unchanged by resizing and mild JPEG, unrelated for different images)."""

    def embed_bytes(self, encoded):
        from PIL import Image

        from tf_retrieval.data.images import decode_image

        rows = []
        for data in encoded:
            thumbnail = Image.fromarray(decode_image(data)).resize((8, 8), Image.Resampling.BOX)
            vector = np.asarray(thumbnail, np.float32).ravel()
            rows.append(vector - vector.mean())
        vectors = np.stack(rows)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def smooth_image(rng, size=96):
    """A random smooth colour image: 6x6 random colours upscaled bicubically, plus a little pixel noise."""
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.float32)
    return Image.fromarray(np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8))


def save(image, path, **options):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **options)


@pytest.fixture
def photos(tmp_path):
    """6 originals (PNG) and 3 copies: orig_0 halved (PNG) and re-encoded as JPEG quality 60, orig_3 enlarged 1.5x and
    re-encoded as JPEG quality 60. Class sub-folders: copies/ and originals/."""
    rng = np.random.default_rng(7)
    root = tmp_path / "photos"
    originals = [smooth_image(rng) for _ in range(6)]
    for i, image in enumerate(originals):
        save(image, str(root / "originals" / f"orig_{i}.png"))
    save(originals[0].resize((48, 48), resample=3), str(root / "copies" / "orig_0_small.png"))
    save(originals[0], str(root / "copies" / "orig_0_q60.jpg"), quality=60)
    save(originals[3].resize((144, 144), resample=3), str(root / "copies" / "orig_3_big_q60.jpg"), quality=60)
    return str(root)


EXPECTED = [["copies/orig_0_q60.jpg", "copies/orig_0_small.png", "originals/orig_0.png"],
            ["copies/orig_3_big_q60.jpg", "originals/orig_3.png"]]


def make_bundle(photos, path, backend="exact"):
    collection = image_folder(photos, progress=False)
    vectors = ThumbnailEmbedder().embed_bytes([collection.read_bytes(i) for i in range(len(collection))])
    config = ModelConfig(name="thumbs", backbone="mobilenet_v2", image_size=32, weights=None)
    build_bundle(path, config, collection, vectors, source=photos, backend=backend)
    return RetrievalEngine.load(path, embedder=ThumbnailEmbedder())


def test_fixture_copies_are_close_and_originals_far(photos):
    collection = image_folder(photos, progress=False)
    vectors = ThumbnailEmbedder().embed_bytes([collection.read_bytes(i) for i in range(len(collection))])
    sims = vectors @ vectors.T
    position = {image_id: i for i, image_id in enumerate(collection.ids)}
    same = {(position[a], position[b]) for group in EXPECTED for a in group for b in group if a != b}
    for i in range(len(vectors)):
        for j in range(len(vectors)):
            if (i, j) in same:
                assert sims[i, j] >= 0.97
            elif i != j:
                assert sims[i, j] < 0.6


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_find_duplicates_groups_resized_and_reencoded_copies(photos, tmp_path, backend):
    engine = make_bundle(photos, str(tmp_path / "bundle"), backend)
    groups = find_duplicates(engine, 0.95)
    assert [group.ids for group in groups] == [[os.path.join(*p.split("/")) for p in ids] for ids in EXPECTED]
    assert all(engine.collection.ids[p] == i for g in groups for p, i in zip(g.positions, g.ids))
    first = groups[0]
    assert len(first.pairs) == 3 and all(score >= 0.95 for *_, score in first.pairs)
    assert [score for *_, score in first.pairs] == sorted((score for *_, score in first.pairs), reverse=True)
    best = max(score for g in groups for *_, score in g.pairs)
    assert best < 1 and find_duplicates(engine, best + 1e-5) == []  # nothing is byte-for-byte the same
    assert [len(g.ids) for g in find_duplicates(engine, -1.0)] == [len(engine)]  # everything joins at -1


def test_find_duplicates_after_deleting_an_image(photos, tmp_path):
    path = str(tmp_path / "bundle")
    make_bundle(photos, path)
    delete_images(path, [os.path.join("copies", "orig_0_small.png"), os.path.join("originals", "orig_3.png")])
    engine = RetrievalEngine.load(path)  # index ids are no longer positions: the groups must still name the right images
    groups = find_duplicates(engine, 0.95)
    assert [g.ids for g in groups] == [[os.path.join("copies", "orig_0_q60.jpg"), os.path.join("originals", "orig_0.png")]]


def test_chains_join_and_long_lists_are_followed():
    angles = np.radians([0, 15, 30, 90])  # cos 15 = 0.966 >= 0.95 > cos 30 = 0.866: 0 ~ 1 ~ 2 by a chain, 3 alone
    index = build_index(np.stack([np.cos(angles), np.sin(angles)], axis=1), [10, 11, 12, 13], backend="exact")
    pairs = duplicate_pairs(index, 0.95)
    assert sorted(pairs) == [(10, 11), (11, 12)] and pairs[(10, 11)] == pytest.approx(np.cos(np.radians(15)), abs=1e-6)
    assert connected_groups(pairs) == [[10, 11, 12]]
    many = build_index(np.ones((30, 3)) + np.arange(30)[:, None] * np.array([[0, 0, 1e-4]]), backend="exact")
    assert len(duplicate_pairs(many, 0.99, k=2, batch_size=7)) == 30 * 29 // 2  # k grows until the lists end
    assert connected_groups({(5, 6): 1.0, (1, 2): 1.0, (2, 9): 1.0}) == [[1, 2, 9], [5, 6]]
    with pytest.raises(ValueError, match="k and batch_size must be positive"):
        duplicate_pairs(index, 0.9, k=0)


def test_cli_dedup_prints_groups_and_writes_json(photos, tmp_path, capsys):
    path = str(tmp_path / "bundle")
    make_bundle(photos, path)
    out = str(tmp_path / "report" / "dups.json")
    assert main(["dedup", "--index", path, "--threshold", "0.95", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "2 group(s) of near-duplicates (5 images) among 9 at similarity >= 0.95" in printed
    assert "group 1: 3 images" in printed and os.path.join("copies", "orig_3_big_q60.jpg") in printed
    report = json.load(open(out))
    assert report["threshold"] == 0.95 and report["images"] == 9 and report["metric"] == "cosine"
    assert [g["ids"] for g in report["groups"]] == [[os.path.join(*p.split("/")) for p in ids] for ids in EXPECTED]
    assert main(["dedup", "--index", path, "-k", "0"]) == 2
    assert "-k must be positive" in capsys.readouterr().err


def test_jpeg_copy_really_differs_in_bytes(photos):
    """Guards the fixture: the copies are not byte-identical files."""
    with open(os.path.join(photos, "originals", "orig_0.png"), "rb") as a, \
            open(os.path.join(photos, "copies", "orig_0_q60.jpg"), "rb") as b:
        from PIL import Image

        original, copy = np.asarray(Image.open(io.BytesIO(a.read()))), np.asarray(Image.open(io.BytesIO(b.read())))
    assert original.shape == copy.shape and np.abs(original.astype(int) - copy.astype(int)).mean() > 0.5
