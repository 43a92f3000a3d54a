import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from helper.data import images as D
from helper.run.errors import UserError


def test_npz_with_two_splits_and_with_one(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    y = np.arange(6)
    np.savez(tmp_path / "two.npz", x_train=x[:4], y_train=y[:4], x_test=x[4:], y_test=y[4:])
    train, test = D.load_splits(str(tmp_path / "two.npz"))
    assert train.x.shape == (4, 3, 32, 32) and train.x.dtype == torch.uint8 and test.y.tolist() == [4, 5]
    assert torch.equal(train.x[1].permute(1, 2, 0), torch.from_numpy(x[1]))
    np.savez(tmp_path / "one.npz", x=x, y=y)
    train, test = D.load_splits(str(tmp_path / "one.npz"))
    assert train is test and len(train) == 6
    assert len(D.defense_pool(train, test, extend=True)) == 6  # one split is not counted twice


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, 32, 32), np.uint8), y=np.zeros(2, int))
    with pytest.raises(UserError, match=r"uint8 of shape \(N,32,32,3\), found uint8 \(2, 3, 32, 32\)"):
        D.load_splits(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "keys.npz", images=np.zeros(1))
    with pytest.raises(UserError, match="must hold x_train"):
        D.load_splits(str(tmp_path / "keys.npz"))
    with pytest.raises(UserError, match="dataset file not found"):
        D.load_splits(str(tmp_path / "missing.npz"))
    with pytest.raises(UserError, match="unknown --dataset 'imagenet'"):
        D.load_splits("imagenet")


def test_synthetic_is_seeded_and_task_differs_from_ood():
    a = D.synthetic_split("task", 64, "train", seed=0)
    b = D.synthetic_split("task", 64, "train", seed=0)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, D.synthetic_split("task", 64, "test", seed=0).x)
    assert not torch.equal(a.x, D.synthetic_split("task", 64, "train", seed=1).x)
    ood = D.synthetic_split("ood", 400, "train", seed=0)
    assert a.y.max() < 10 and ood.y.max() >= 10  # 100 other classes
    assert a.x.dtype == torch.uint8 and a.x.shape == (64, 3, 32, 32)
    train, test = D.load_splits("synthetic", role="ood", synthetic_train=30, synthetic_test=20)
    assert len(train) == 30 and len(test) == 20 and len(D.defense_pool(train, test, extend=True)) == 50


@pytest.mark.parametrize("n,rate,k", [(50000, 0.1, 5000), (50000, 1.0, 50000), (60000, 1.0, 60000), (10, 0.25, 2)])
def test_seeded_subset_sizes(n, rate, k):
    split = D.Split(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), torch.arange(n))
    sub = D.seeded_subset(split, rate, seed=3)
    assert len(sub) == k and len(set(sub.y.tolist())) == k
    assert torch.equal(sub.y, D.seeded_subset(split, rate, seed=3).y)
    if k < n:
        assert not torch.equal(sub.y, D.seeded_subset(split, rate, seed=4).y)


@pytest.mark.parametrize("rate", [0.0, 1.5, -0.1])
def test_subset_rate_outside_range(rate):
    split = D.Split(torch.zeros(10, 1, 1, 1, dtype=torch.uint8), torch.arange(10))
    with pytest.raises(UserError, match="subset_rate must be in"):
        D.seeded_subset(split, rate, 0)


def test_augment_is_a_padded_crop_with_optional_flip():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (32, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is recognisable
    out = D.augment(x, torch.Generator().manual_seed(1), pad=2)
    assert out.shape == (32, 3, 8, 8) and out.dtype == torch.float32
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2)).float() / 255
    flips = set()
    for i in range(len(x)):
        found = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert found, f"image {i} is no padded crop of its input"
        flips.add(found[0][2])
    assert flips == {False, True}


def test_batches_cover_every_index_once():
    parts = D.batches(10, 4, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))


# ---------------------------------------------------------------- CIFAR through torchvision, offline

def _fake_cifar10_archive(root, n=4):
    """cifar-10-python.tar.gz with the real layout and tiny batches; returns the md5s to patch in."""
    from torchvision.datasets.utils import calculate_md5
    folder = os.path.join(root, "build", "cifar-10-batches-py")
    os.makedirs(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [k % 10] * n}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    archive = os.path.join(root, "cifar-10-python.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    md5 = {name: calculate_md5(os.path.join(folder, name)) for name in names + ["batches.meta"]}
    return archive, calculate_md5(archive), md5


def _patch_cifar10(monkeypatch, tgz_md5, md5):
    from torchvision.datasets import CIFAR10
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    monkeypatch.setattr(CIFAR10, "tgz_md5", tgz_md5)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})


def test_cifar_archive_in_data_root_is_extracted_and_loaded_offline(tmp_path, monkeypatch):
    archive, tgz_md5, md5 = _fake_cifar10_archive(str(tmp_path))
    _patch_cifar10(monkeypatch, tgz_md5, md5)
    train, test = D.load_splits("cifar10", data_root=str(tmp_path))
    assert len(train) == 20 and len(test) == 4 and train.x.shape == (20, 3, 32, 32)
    assert test.y.tolist() == [5] * 4
    assert os.path.isdir(tmp_path / "cifar-10-batches-py")


def test_missing_cifar_offline_says_which_archive_to_put_where(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    root = str(tmp_path / "empty")
    with pytest.raises(UserError) as e:
        D.load_splits("cifar10", data_root=root)
    msg = str(e.value)
    assert "could not be downloaded" in msg and os.path.join(root, "cifar-10-python.tar.gz") in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="--no_download is set"):
        D.load_splits("cifar10", data_root=root, download=False)
