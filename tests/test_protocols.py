import numpy as np
import pytest

from tf_retrieval.data.images import ImageCollection
from tf_retrieval.data.protocols import PROTOCOLS, dataset_family, make_protocol


def fake_collection(labels, splits, name="fake"):
    n = len(labels)
    return ImageCollection(name, ids=[f"img{i}" for i in range(n)], labels=labels, class_names=[str(c) for c in range(102)],
                           splits=splits, encoded=[b""] * n)


@pytest.fixture
def cifar():
    # 10 classes; train: 600 per class, test: 120 per class.
    labels = np.concatenate([np.repeat(np.arange(10), 600), np.repeat(np.arange(10), 120)])
    splits = np.array(["train"] * 6000 + ["test"] * 1200)
    return fake_collection(labels, splits, "cifar10")


def test_cifar10_2(cifar):
    p = make_protocol("cifar10-2", cifar)
    assert len(p.queries) == 1200 and len(p.database) == 6000
    np.testing.assert_array_equal(p.train, p.database)
    assert (cifar.splits[p.queries] == "test").all() and (cifar.splits[p.database] == "train").all()


def test_cifar10_1_samples_100_queries_per_class(cifar):
    p = make_protocol("cifar10-1", cifar, seed=3)
    assert np.bincount(cifar.labels[p.queries]).tolist() == [100] * 10
    assert (cifar.splits[p.queries] == "test").all()
    assert len(p.database) == 7200 - 1000 and not set(p.queries) & set(p.database)
    assert np.bincount(cifar.labels[p.train]).tolist() == [500] * 10 and set(p.train) <= set(p.database)
    np.testing.assert_array_equal(make_protocol("cifar10-1", cifar, seed=3).queries, p.queries)  # seeded
    assert not np.array_equal(make_protocol("cifar10-1", cifar, seed=4).queries, p.queries)


def test_cifar10_unseen_holds_out_classes_8_and_9(cifar):
    p = make_protocol("cifar10-unseen", cifar)
    assert set(cifar.labels[p.train]) == set(range(8))
    assert set(cifar.labels[p.queries]) == {8, 9} and set(cifar.labels[p.database]) == {8, 9}
    assert len(p.queries) == 240 and len(p.database) == 1200
    assert p.class_disjoint and not make_protocol("cifar10-2", cifar).class_disjoint


def test_flowers_protocols():
    labels = np.repeat(np.arange(102), 4)
    splits = np.tile(["train", "validation", "test", "test"], 102)
    flowers = fake_collection(labels, splits, "oxford_flowers102")
    disjoint = make_protocol("flowers-disjoint", flowers)
    assert disjoint.leave_one_out and disjoint.queries is None and disjoint.class_disjoint
    assert set(labels[disjoint.train]) == set(range(51)) and set(labels[disjoint.database]) == set(range(51, 102))
    official = make_protocol("flowers-official", flowers)
    assert len(official.database) == 204 and len(official.queries) == 204 and not official.class_disjoint
    assert "leave-one-out" in disjoint.summary()


def test_protocol_errors(cifar):
    with pytest.raises(ValueError, match="unknown protocol 'cifar100'"):
        make_protocol("cifar100", cifar)
    with pytest.raises(ValueError, match="has no validation split"):
        make_protocol("flowers-official", cifar)
    with pytest.raises(ValueError, match="needs images of classes 0-50 and 51-101"):
        make_protocol("flowers-disjoint", cifar)
    eight_classes = fake_collection(cifar.labels % 8, cifar.splits, "eight")
    with pytest.raises(ValueError, match="cifar10-unseen: eight gives no database and no queries images"):
        make_protocol("cifar10-unseen", eight_classes)
    assert {dataset_family(p) for p in PROTOCOLS} == {"cifar10", "flowers"}
