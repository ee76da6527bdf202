"""File formats and dataset loaders: real MNIST-family files, tiny CIFAR / image-folder fixtures."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import struct
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedslim.data import DataError, formats, load_dataset
from fedslim.data import datasets as ds
from fedslim.registry import UnknownNameError

SHARED = Path(os.environ.get("FEDSLIM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_shared = pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="shared data folder not present")
IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Decoded-image caches go to a per-test folder, never the real ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "fedslim"


# ---------------------------------------------------------------------------------------------
# helpers


def files_under(p: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``p`` with its size and mtime: to show a data folder was left alone."""
    return {str(f.relative_to(p)): (f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file()}


def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 0x0800 | arr.ndim
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_tiny_idx(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def write_cifar_batches(folder: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Batches in the original format: a Python-2 style dict with bytes keys, 'data' (N, 3072) uint8."""
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(per_batch) + i) % 10]
        blob = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                b"filenames": [b"x.png"] * per_batch}
        (folder / name).write_bytes(pickle.dumps(blob, protocol=2))
        out[name] = (data, labels)
    meta = {b"label_names": [n.encode() for n in ds.CIFAR10_CLASSES], b"num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


def write_image_tree(tree: Path, classes: list[str], per_class: int, size: tuple[int, int] = (5, 4),
                     mode: str = "RGB", ext: str = "png") -> dict[Path, np.ndarray]:
    rng = np.random.default_rng(3)
    written = {}
    for split in ("train", "test"):
        for c in classes:
            d = tree / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                arr = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(arr, mode).save(d / f"{k:04d}.{ext}")
                written[d / f"{k:04d}.{ext}"] = arr
    return written


# ---------------------------------------------------------------------------------------------
# IDX: real files


@needs_shared
def test_idx_parse_of_shared_mnist_matches_the_known_dataset() -> None:
    d = SHARED / "mnist"
    xtr = formats.read_idx_images(d / "train-images-idx3-ubyte.gz")
    ytr = formats.read_idx_labels(d / "train-labels-idx1-ubyte.gz")
    xte = formats.read_idx_images(d / "t10k-images-idx3-ubyte.gz")
    yte = formats.read_idx_labels(d / "t10k-labels-idx1-ubyte.gz")
    assert xtr.shape == (60000, 28, 28) and xtr.dtype == np.uint8
    assert xte.shape == (10000, 28, 28)
    assert ytr.shape == (60000,) and yte.shape == (10000,)
    assert set(np.unique(ytr)) == set(range(10)) == set(np.unique(yte))
    assert abs(xtr.mean() / 255.0 - 0.1307) < 5e-4
    assert int(ytr[0]) == 5 and int(yte[0]) == 7  # the well-known first labels


@needs_shared
def test_load_mnist_is_normalised_nchw_and_subsets_take_the_first_samples() -> None:
    b = load_dataset("mnist", SHARED)
    assert (len(b.train), len(b.test), b.input_shape, b.num_classes) == (60000, 10000, (1, 28, 28), 10)
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert abs(b.train.x.mean().item()) < 1e-3 and abs(b.train.x.std().item() - 1.0) < 1e-3
    small = load_dataset("mnist", SHARED, train_subset=100, test_subset=7)
    assert len(small.train) == 100 and len(small.test) == 7
    assert torch.equal(small.train.x, b.train.x[:100]) and torch.equal(small.test.y, b.test.y[:7])
    with pytest.raises(ValueError, match="data.train_subset"):
        load_dataset("mnist", SHARED, train_subset=60001)


@needs_shared
def test_uncompressed_idx_loads_the_same_as_gzip(tmp_path: Path) -> None:
    raw = tmp_path / "mnist"
    raw.mkdir()
    for name in IDX_NAMES:
        (raw / name).write_bytes(gzip.decompress((SHARED / "mnist" / f"{name}.gz").read_bytes()))
    a = load_dataset("mnist", tmp_path)
    b = load_dataset("mnist", SHARED)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)


@needs_shared
def test_torchvision_raw_layout_is_found(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_NAMES:
        (raw / f"{name}.gz").symlink_to(SHARED / "mnist" / f"{name}.gz")
    b = load_dataset("mnist", tmp_path, test_subset=10)
    assert len(b.train) == 60000 and b.test.y[:3].tolist() == [7, 2, 1]


@needs_shared
def test_fmnist_loads_with_class_names_and_refuses_mnist_files() -> None:
    b = load_dataset("fmnist", SHARED)
    assert len(b.train) == 60000 and b.class_names[0] == "T-shirt/top" and b.class_names[9] == "Ankle boot"
    # Same file names, other dataset: the label content gives it away.
    with pytest.raises(DataError, match="mnist labels, not fmnist"):
        load_dataset("fmnist", SHARED / "mnist")


# ---------------------------------------------------------------------------------------------
# IDX: broken files


def test_tiny_idx_round_trip_gz_and_raw(tmp_path: Path) -> None:
    arrays = write_tiny_idx(tmp_path / "a" / "mnist", gz=True)
    write_tiny_idx(tmp_path / "b", gz=False)  # directly in the root, uncompressed
    for root in (tmp_path / "a", tmp_path / "b"):
        b = load_dataset("mnist", root, options={"normalize": False})
        expect = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float()[:, None] / 255
        assert torch.allclose(b.train.x, expect)
        assert b.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_truncated_idx_names_the_file(tmp_path: Path) -> None:
    write_tiny_idx(tmp_path / "mnist")
    f = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:1000]))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    assert str(f) in str(e.value) and "truncated" in str(e.value) and "found 1000" in str(e.value)


def test_wrong_magic_names_the_file_and_both_magics(tmp_path: Path) -> None:
    write_tiny_idx(tmp_path / "mnist")
    d = tmp_path / "mnist"
    # A labels file where the images should be.
    (d / "t10k-images-idx3-ubyte.gz").write_bytes((d / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert str(d / "t10k-images-idx3-ubyte.gz") in msg
    assert "wrong magic 0x00000801, expected 0x00000803 (IDX images)" in msg


def test_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    write_tiny_idx(tmp_path / "mnist")
    f = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    data = bytearray(f.read_bytes())
    f.write_bytes(bytes(data[: len(data) // 2]))  # cut mid-stream
    with pytest.raises(DataError, match="corrupt gzip") as e:
        load_dataset("mnist", tmp_path)
    assert str(f) in str(e.value)
    f.write_bytes(b"plain bytes, no gzip header")
    with pytest.raises(DataError, match="not a gzip file"):
        formats.read_idx_labels(f)


def test_missing_dataset_says_where_it_looked_and_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "mnist") in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert "fedslim data download mnist --to DIR" in msg


def test_partial_idx_folder_names_the_missing_file(tmp_path: Path) -> None:
    write_tiny_idx(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def test_data_root_defaults_to_env_then_dot_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiny_idx(tmp_path / "env" / "mnist", n_train=12)
    monkeypatch.setenv("FEDSLIM_DATA", str(tmp_path / "env"))
    assert len(load_dataset("mnist").train) == 12
    monkeypatch.delenv("FEDSLIM_DATA")
    monkeypatch.chdir(tmp_path)
    write_tiny_idx(tmp_path / "data" / "mnist", n_train=14)
    assert len(load_dataset("mnist").train) == 14
    assert ds.resolve_root(None) == Path("data")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 pickles


def test_cifar_pickle_batches_load_in_nchw_order(tmp_path: Path) -> None:
    batches = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    b = load_dataset("cifar10", tmp_path, options={"normalize": False})
    assert (len(b.train), len(b.test), b.input_shape) == (20, 4, (3, 32, 32))
    assert b.class_names == ds.CIFAR10_CLASSES
    data, labels = batches["data_batch_2"]
    # Row layout: 1024 red, 1024 green, 1024 blue, each row-major; sample 0 of batch 2 is train[4].
    flat = data[0]
    assert b.train.x[4, 1, 2, 3].item() == pytest.approx(flat[1024 + 2 * 32 + 3] / 255.0)
    assert b.train.y[4:8].tolist() == labels
    assert b.test.y.tolist() == batches["test_batch"][1]


def test_cifar_python_tarball_is_unpacked_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_cifar_batches(src / "cifar-10-batches-py")
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tf:
        tf.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    a = load_dataset("cifar10", root)
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left
    (root / "cifar-10-python.tar.gz").unlink()  # second load reads the unpacked folder
    b = load_dataset("cifar10", root)
    assert torch.equal(a.train.x, b.train.x)


def test_hostile_pickle_is_refused_without_running(tmp_path: Path) -> None:
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.mkdir, (str(marker),))

    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load global") as e:
        load_dataset("cifar10", tmp_path)
    assert str(bad) in str(e.value) and not marker.exists()


def test_truncated_cifar_pickle_names_the_file(tmp_path: Path) -> None:
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(DataError, match="corrupt or unsupported pickle") as e:
        load_dataset("cifar10", tmp_path)
    assert str(bad) in str(e.value)


def test_cifar_missing_lists_every_accepted_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path)
    for want in ("cifar-10-batches-py/", "cifar-10-python.tar.gz", "cifar10-jpeg/", "cifar10-jpeg.tar.gz",
                 "fedslim data download cifar10"):
        assert want in str(e.value)


# ---------------------------------------------------------------------------------------------
# image folders


def test_image_folder_loads_sorted_classes_and_exact_pixels(tmp_path: Path) -> None:
    tree = tmp_path / "imgs"
    written = write_image_tree(tree, ["dog", "cat"], per_class=3)
    b = load_dataset("imagefolder", options={"path": str(tree), "normalize": False, "shuffle": False})
    assert b.class_names == ["cat", "dog"] and b.input_shape == (3, 4, 5)
    assert b.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    first_dog = written[tree / "train" / "dog" / "0000.png"]
    assert torch.allclose(b.train.x[3], torch.from_numpy(first_dog).permute(2, 0, 1).float() / 255)
    shuffled = load_dataset("imagefolder", tmp_path / "imgs")  # data.root works as well as options.path
    assert sorted(shuffled.train.y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert abs(shuffled.train.x.mean().item()) < 1e-4  # normalised with the folder's own statistics


def test_grey_image_folder_has_one_channel(tmp_path: Path) -> None:
    write_image_tree(tmp_path, ["a", "b"], per_class=2, mode="L")
    assert load_dataset("imagefolder", tmp_path).input_shape == (1, 4, 5)


def test_image_folder_size_mismatch_names_the_first_odd_file(tmp_path: Path) -> None:
    write_image_tree(tmp_path, ["a", "b"], per_class=2)
    odd = tmp_path / "train" / "b" / "0001.png"
    Image.new("RGB", (6, 4)).save(odd)
    with pytest.raises(DataError, match="6x4 with 3 channels, expected 5x4") as e:
        load_dataset("imagefolder", tmp_path)
    assert str(e.value).startswith(str(odd))


def test_empty_training_class_folder_is_refused_by_name(tmp_path: Path) -> None:
    write_image_tree(tmp_path, ["a", "b"], per_class=2)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "notes").mkdir()
    (tmp_path / "train" / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="class folders empty, notes hold no image files") as e:
        load_dataset("imagefolder", tmp_path)
    assert str(tmp_path / "train") in str(e.value)
    # A test split may lack a class: it simply has no test samples of it.
    (tmp_path / "train" / "empty").rmdir()
    for f in (tmp_path / "train" / "notes").iterdir():
        f.unlink()
    (tmp_path / "train" / "notes").rmdir()
    (tmp_path / "test" / "b").rename(tmp_path / "b-moved")
    b = load_dataset("imagefolder", tmp_path)
    assert b.class_names == ["a", "b"] and sorted(b.test.y.tolist()) == [0, 0]


def test_undecodable_image_names_the_file(tmp_path: Path) -> None:
    write_image_tree(tmp_path, ["a"], per_class=2)
    bad = tmp_path / "test" / "a" / "0001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode image") as e:
        load_dataset("imagefolder", tmp_path)
    assert str(bad) in str(e.value)


def test_image_folder_cache_is_reused_then_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       user_cache: Path) -> None:
    tree = tmp_path / "imgs"
    write_image_tree(tree, ["a", "b"], per_class=2)
    before = files_under(tmp_path / "imgs")
    first = load_dataset("imagefolder", options={"path": str(tree), "cache": True})
    cache = ds.cache_path(tree, shuffle=True)
    assert cache is not None and cache.parent.parent == user_cache and cache.is_file()
    assert files_under(tmp_path / "imgs") == before and not (tmp_path / "imgs.npz").exists()
    assert list(cache.parent.iterdir()) == [cache]  # written via a temporary file, none left over

    real_decode = formats.decode_image
    calls = []

    def counting(data, where):  # type: ignore[no-untyped-def]
        calls.append(where)
        return real_decode(data, where)

    monkeypatch.setattr(formats, "decode_image", counting)
    again = load_dataset("imagefolder", options={"path": str(tree), "cache": True})
    assert calls == [] and torch.equal(first.train.x, again.train.x)
    Image.new("RGB", (5, 4), (255, 0, 0)).save(tree / "train" / "a" / "0099.png")
    grown = load_dataset("imagefolder", options={"path": str(tree), "cache": True})
    assert len(grown.train) == 5 and len(calls) == 9  # everything decoded again, cache rewritten
    calls.clear()
    load_dataset("imagefolder", options={"path": str(tree), "cache": True})
    assert calls == []
    assert list(cache.parent.iterdir()) == [cache]  # the same file replaced, no second cache


def test_image_rewritten_in_place_invalidates_the_cache(tmp_path: Path) -> None:
    tree = tmp_path / "imgs"
    write_image_tree(tree, ["a", "b"], per_class=2)
    opts = {"path": str(tree), "cache": True, "shuffle": False, "normalize": False}
    old = load_dataset("imagefolder", options=opts)
    assert old.train.x[0].max() > 0
    target = tree / "train" / "a" / "0000.png"
    st = target.stat()
    Image.new("RGB", (5, 4), (0, 0, 0)).save(target)  # same name, new pixels and size
    # Back-date it: neither the folder's nor the cache's mtime can tell, only the file's own stat.
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    new = load_dataset("imagefolder", options=opts)
    assert new.train.x[0].max() == 0 and torch.equal(new.train.x[1:], old.train.x[1:])


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    tree = tmp_path / "imgs"
    write_image_tree(tree, ["a", "b"], per_class=2)
    opts = {"path": str(tree), "cache": True}
    first = load_dataset("imagefolder", options=opts)
    cache = ds.cache_path(tree, True)
    assert cache is not None
    cache.write_bytes(cache.read_bytes()[:200])  # truncated: not a readable zip any more
    assert torch.equal(load_dataset("imagefolder", options=opts).train.x, first.train.x)
    assert ds._read_cache(cache, ds._tree_signature(tree, True)[0]) is not None  # rewritten whole


def test_two_data_folders_never_share_a_cache(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_image_tree(a / "cifar10-jpeg", ds.CIFAR10_CLASSES, per_class=1, size=(32, 32), ext="png")
    write_image_tree(b / "cifar10-jpeg", ds.CIFAR10_CLASSES, per_class=1, size=(32, 32), ext="png")
    for f in (b / "cifar10-jpeg" / "train").rglob("*.png"):  # same layout and names, other pixels
        Image.new("RGB", (32, 32), (7, 7, 7)).save(f)
    opts = {"source": "jpeg", "normalize": False}
    xa, xb = load_dataset("cifar10", a, options=opts).train.x, load_dataset("cifar10", b, options=opts).train.x
    assert not torch.equal(xa, xb) and torch.all(xb == 7 / 255)
    ca, cb = ds.cache_path(a / "cifar10-jpeg", True), ds.cache_path(b / "cifar10-jpeg", True)
    assert ca != cb and ca is not None and cb is not None and ca.is_file() and cb.is_file()
    # And through a symlink the folder is the same one: the key is the resolved path.
    (tmp_path / "link").symlink_to(a)
    assert ds.cache_path(tmp_path / "link" / "cifar10-jpeg", True) == ca
    assert torch.equal(load_dataset("cifar10", tmp_path / "link", options=opts).train.x, xa)


def test_cache_folder_follows_xdg_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            user_cache: Path) -> None:
    assert ds.user_cache_dir() == user_cache
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: only absolute paths count
    assert ds.user_cache_dir() == tmp_path / "home" / ".cache" / "fedslim"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ds.user_cache_dir() == tmp_path / "home" / ".cache" / "fedslim"


def test_unwritable_cache_folder_just_skips_caching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    tree = tmp_path / "imgs"
    write_image_tree(tree, ["a", "b"], per_class=2)
    before = files_under(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = load_dataset("imagefolder", options={"path": str(tree), "cache": True})
    assert len(b.train) == 4 and files_under(tmp_path) == before


def test_cifar10_jpeg_tree_and_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path) -> None:
    classes = ds.CIFAR10_CLASSES
    src = tmp_path / "src"
    write_image_tree(src / "cifar10-jpeg", classes, per_class=2, size=(32, 32), ext="jpg")
    src_files = files_under(src)
    from_tree = load_dataset("cifar10", src, options={"source": "jpeg"})
    assert (len(from_tree.train), len(from_tree.test), from_tree.input_shape) == (20, 20, (3, 32, 32))
    assert files_under(src) == src_files  # the data folder is read, never written
    tree_cache = ds.cache_path(src / "cifar10-jpeg", True)
    assert tree_cache is not None and tree_cache.is_file() and user_cache in tree_cache.parents

    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar10-jpeg.tar.gz", "w:gz") as tf:
        tf.add(src / "cifar10-jpeg", arcname="cifar10-jpeg")
    from_tar = load_dataset("cifar10", root)
    assert torch.equal(from_tar.train.x, from_tree.train.x) and torch.equal(from_tar.test.y, from_tree.test.y)
    assert [p.name for p in root.iterdir()] == ["cifar10-jpeg.tar.gz"]  # not unpacked, no cache beside it
    tar_cache = ds.cache_path(root / "cifar10-jpeg.tar.gz", True)
    assert tar_cache is not None and tar_cache.is_file() and tar_cache != tree_cache

    def no_decode(*_a, **_k):  # type: ignore[no-untyped-def]
        raise AssertionError("decoded although the cache is fresh")

    monkeypatch.setattr(formats, "decode_image", no_decode)
    cached = load_dataset("cifar10", root)
    assert torch.equal(cached.train.x, from_tree.train.x)
    # A changed archive (new size and mtime) is not served from the old cache.
    with open(root / "cifar10-jpeg.tar.gz", "ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(AssertionError, match="decoded although"):
        load_dataset("cifar10", root)
    # With the source gone there is nothing to load, whatever the cache holds.
    (root / "cifar10-jpeg.tar.gz").unlink()
    with pytest.raises(DataError, match="dataset 'cifar10' not found"):
        load_dataset("cifar10", root)


def test_corrupt_tarball_names_the_archive(tmp_path: Path) -> None:
    (tmp_path / "cifar10-jpeg.tar.gz").write_bytes(gzip.compress(b"x" * 600)[:40])
    with pytest.raises(DataError, match="corrupt or truncated archive") as e:
        load_dataset("cifar10", tmp_path)
    assert str(tmp_path / "cifar10-jpeg.tar.gz") in str(e.value)


@pytest.mark.slow
@needs_shared
def test_real_cifar10_jpeg_tarball(tmp_path: Path) -> None:
    (tmp_path / "cifar10-jpeg.tar.gz").symlink_to(SHARED / "cifar10-jpeg.tar.gz")
    b = load_dataset("cifar10", tmp_path, options={"normalize": False})
    assert (len(b.train), len(b.test)) == (50000, 10000)
    mean = b.train.x.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.491, 0.482, 0.447]), atol=3e-3)
    assert np.bincount(b.test.y.numpy()).tolist() == [1000] * 10


# ---------------------------------------------------------------------------------------------
# verify: the copy the loader reads


@pytest.fixture
def small_cifar_sizes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Verify expects 2 train and 1 test image per class (and 4-image batches) instead of CIFAR-10's
    5000 / 1000 (and 10000), so tiny fixtures stand in for the real thing."""
    monkeypatch.setattr(ds, "CIFAR10_SPLIT_SIZES", {"train": 20, "test": 10})
    monkeypatch.setattr(ds, "_CIFAR_BATCH_SIZE", 4)
    yield


def write_cifar_jpeg_tree(tree: Path) -> None:
    write_image_tree(tree, ds.CIFAR10_CLASSES, per_class=2, size=(32, 32), ext="jpg")
    for c in ds.CIFAR10_CLASSES:  # 2 train, 1 test per class
        (tree / "test" / c / "0001.jpg").unlink()


def failures(results: list[tuple[Path, bool, str]]) -> dict[Path, str]:
    return {p: msg for p, ok, msg in results if not ok}


@pytest.mark.parametrize(("layout", "source", "form", "path"), [
    (["cifar-10-batches-py", "cifar10-jpeg"], "auto", "pickle-dir", "cifar-10-batches-py"),
    (["cifar10/cifar-10-batches-py", "cifar10-jpeg"], "auto", "pickle-dir", "cifar10/cifar-10-batches-py"),
    (["cifar-10-batches-py", "cifar10-jpeg"], "jpeg", "jpeg-dir", "cifar10-jpeg"),
    (["cifar10-jpeg", "cifar10-jpeg.tar.gz"], "auto", "jpeg-dir", "cifar10-jpeg"),
    (["CIFAR10/cifar10-jpeg.tar.gz"], "auto", "jpeg-tar", "CIFAR10/cifar10-jpeg.tar.gz"),
    (["cifar-10-python.tar.gz", "cifar10-jpeg"], "auto", "pickle-tar", "cifar-10-python.tar.gz"),
])
def test_verify_checks_the_copy_the_loader_reads(tmp_path: Path, small_cifar_sizes: None, layout: list[str],
                                                  source: str, form: str, path: str) -> None:
    src = tmp_path / "src"
    write_cifar_batches(src / "cifar-10-batches-py")
    write_cifar_jpeg_tree(src / "cifar10-jpeg")
    root = tmp_path / "root"
    for item in layout:
        name = Path(item).name
        (root / item).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".tar.gz"):
            top = "cifar-10-batches-py" if name.startswith("cifar-10-") else "cifar10-jpeg"
            with tarfile.open(root / item, "w:gz") as tf:
                tf.add(src / top, arcname=top)
        else:
            shutil.copytree(src / name, root / item)
    assert ds.find_cifar10(root, source) == (form, root / path)
    results = ds.verify_cifar10(root, source)
    first_path, _, first_msg = results[0]
    assert first_path == root / path and first_msg.startswith(ds.CIFAR10_FORMS[form])
    if form.endswith("-tar"):  # a home-made archive is readable but is not the published file
        assert len(results) == 1 and "checksum mismatch" in first_msg and not results[0][1]
    else:
        assert failures(results) == {} and len(results) > 1
    # The loader reads the very same copy: the pickled test split has 4 images, the JPEG one 10.
    b = load_dataset("cifar10", root, options={"source": source, "normalize": False, "cache": False})
    assert (len(b.test) == 4) == form.startswith("pickle")


def test_verify_jpeg_tree_names_each_missing_or_corrupt_file(tmp_path: Path, small_cifar_sizes: None) -> None:
    tree = tmp_path / "cifar10-jpeg"
    write_cifar_jpeg_tree(tree)
    before = files_under(tmp_path)
    results = ds.verify_cifar10(tmp_path)
    assert failures(results) == {}
    assert [p for p, _, _ in results] == [tree, *(tree / "train" / c for c in ds.CIFAR10_CLASSES),
                                          *(tree / "test" / c for c in ds.CIFAR10_CLASSES)]
    assert "JPEG image-folder tree (the copy the cifar10 loader reads)" in results[0][2]
    assert results[1][2] == "2 images, all decode as 32x32 with 3 channels"
    assert files_under(tmp_path) == before  # verify writes nothing, not even a cache

    shutil.rmtree(tree / "test" / "ship")                          # a missing class folder
    (tree / "train" / "cat" / "0001.jpg").unlink()                 # a missing image
    (tree / "train" / "dog" / "0000.jpg").write_bytes(b"\xff\xd8 not really")  # an unreadable JPEG
    good = (tree / "train" / "frog" / "0001.jpg").read_bytes()
    (tree / "train" / "frog" / "0001.jpg").write_bytes(good[: len(good) // 2])  # a truncated one
    Image.new("RGB", (30, 32)).save(tree / "train" / "bird" / "0000.jpg")  # the wrong size
    (tree / "test" / "spaceship").mkdir()                          # a class CIFAR-10 does not have
    bad = failures(ds.verify_cifar10(tmp_path))
    assert sorted(bad) == sorted([tree, tree / "test" / "ship", tree / "train" / "cat", tree / "train" / "dog",
                                  tree / "train" / "frog", tree / "train" / "bird"])
    assert "unexpected class folder test/spaceship" in bad[tree]
    assert bad[tree / "test" / "ship"] == "class folder not found (expected 1 image in it)"
    assert bad[tree / "train" / "cat"] == "1 image, expected 2"
    assert "0000.jpg: cannot decode image" in bad[tree / "train" / "dog"]
    assert "0001.jpg: cannot decode image" in bad[tree / "train" / "frog"]
    assert "0000.jpg: image is 30x32 with 3 channels, expected 32x32 with 3 channels" in bad[tree / "train" / "bird"]


def test_verify_jpeg_tree_without_a_split(tmp_path: Path, small_cifar_sizes: None) -> None:
    tree = tmp_path / "cifar10" / "cifar10-jpeg"
    write_cifar_jpeg_tree(tree)
    shutil.rmtree(tree / "test")
    results = ds.verify_cifar10(tmp_path)
    assert failures(results) == {tree: results[0][2]} and "test/ folder not found" in results[0][2]
    assert len(results) == 11  # the tree, then train's ten classes


def test_verify_pickled_batches_counts_and_parses(tmp_path: Path, small_cifar_sizes: None) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(folder)
    results = ds.verify_cifar10(tmp_path)
    assert failures(results) == {} and len(results) == 8  # folder, 6 batches, batches.meta
    assert results[0][0] == folder and results[0][2].startswith("pickled batches folder")
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").write_bytes((folder / "data_batch_1").read_bytes()[:300])
    (folder / "data_batch_5").write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 12]}))
    bad = failures(ds.verify_cifar10(tmp_path))
    assert sorted(bad) == sorted([folder, folder / "data_batch_3", folder / "data_batch_5", folder / "test_batch"])
    assert "missing data_batch_3" in bad[folder] and bad[folder / "data_batch_3"] == "file not found"
    assert bad[folder / "data_batch_5"] == "3 images, expected 4; labels 0..12, expected 0..9"
    assert "corrupt or unsupported pickle" in bad[folder / "test_batch"]


def test_verify_cifar10_not_found_lists_the_layouts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset 'cifar10' not found") as e:
        ds.verify_cifar10(tmp_path)
    for want in ("cifar-10-batches-py/", "cifar-10-python.tar.gz", "cifar10-jpeg/", "cifar10-jpeg.tar.gz"):
        assert want in str(e.value)
    with pytest.raises(DataError, match=r"looked for cifar10-jpeg/, cifar10-jpeg\.tar\.gz in"):
        ds.verify_cifar10(tmp_path, "jpeg")


@needs_shared
def test_verify_shared_cifar10_jpeg_archive() -> None:
    [(path, ok, msg)] = ds.verify_cifar10(SHARED)
    assert path == SHARED / "cifar10-jpeg.tar.gz" and ok, msg
    assert msg.startswith("JPEG image-folder archive") and "sha256 of the file ok" in msg


@pytest.mark.slow
@needs_shared
def test_verify_real_unpacked_cifar10_jpeg_tree(tmp_path: Path) -> None:
    with tarfile.open(SHARED / "cifar10-jpeg.tar.gz") as tf:
        tf.extractall(tmp_path, filter="data")
    tree = tmp_path / "cifar10-jpeg"
    results = ds.verify_cifar10(tmp_path)
    assert failures(results) == {} and len(results) == 21
    assert results[1] == (tree / "train" / "airplane", True, "5000 images, all decode as 32x32 with 3 channels")
    assert results[-1] == (tree / "test" / "truck", True, "1000 images, all decode as 32x32 with 3 channels")
    (tree / "test" / "dog" / "0007.jpg").write_bytes((tree / "test" / "dog" / "0007.jpg").read_bytes()[:300])
    (tree / "train" / "cat" / "0003.jpg").unlink()
    bad = failures(ds.verify_cifar10(tmp_path))
    assert sorted(bad) == [tree / "test" / "dog", tree / "train" / "cat"]
    assert bad[tree / "train" / "cat"] == "4999 images, expected 5000"
    assert "0007.jpg: cannot decode image" in bad[tree / "test" / "dog"]


# ---------------------------------------------------------------------------------------------
# built-in datasets and options


def test_digits_split_is_stratified_and_fixed() -> None:
    a = load_dataset("digits")
    b = load_dataset("digits")
    assert (len(a.train), len(a.test), a.input_shape) == (1437, 360, (1, 8, 8))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    counts = np.bincount(a.test.y.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~10 % of each class of ~180
    other = load_dataset("digits", options={"split_seed": 1})
    assert not torch.equal(other.test.y, a.test.y)


def test_synthetic_shape_classes_and_seed() -> None:
    opts = {"num_samples": 60, "test_samples": 30, "num_classes": 3, "shape": [3, 4, 4]}
    a = load_dataset("synthetic", options=opts)
    assert a.train.x.shape == (60, 3, 4, 4) and a.input_shape == (3, 4, 4) and a.num_classes == 3
    assert np.bincount(a.train.y.numpy()).tolist() == [20, 20, 20]
    assert torch.equal(a.train.x, load_dataset("synthetic", options=opts).train.x)
    assert not torch.equal(a.train.x, load_dataset("synthetic", options={**opts, "seed": 1}).train.x)
    # Learnable: nearest class mean on train labels classifies the test split well.
    means = torch.stack([a.train.x[a.train.y == c].mean(0) for c in range(3)]).flatten(1)
    pred = torch.cdist(a.test.x.flatten(1), means).argmin(1)
    assert (pred == a.test.y).float().mean() > 0.9


def test_unknown_option_and_wrong_type_are_named() -> None:
    with pytest.raises(ValueError, match=r"data\.options\.bogus: unknown option .*allowed: normalize"):
        load_dataset("mnist", options={"bogus": 1})
    with pytest.raises(ValueError, match=r"data\.options\.num_classes: expected an integer"):
        load_dataset("synthetic", options={"num_classes": "ten"})
    with pytest.raises(UnknownNameError, match="did you mean 'mnist'"):
        load_dataset("mnsit")


def test_parse_idx_rejects_trailing_bytes() -> None:
    data = idx_bytes(np.zeros(5, np.uint8)) + b"\0"
    with pytest.raises(DataError, match="trailing data: expected 13 bytes"):
        formats.parse_idx(data, Path("x"), formats.IDX_LABELS)
    assert formats.parse_idx(io.BytesIO(data[:-1]).read(), Path("x"), formats.IDX_LABELS).shape == (5,)


def test_out_of_range_idx_label_names_the_file_and_sample(tmp_path: Path) -> None:
    # Before: a labels byte of 200 loaded silently (`data info` counted 1 sample fewer than it listed) and a
    # run died later in the partition report with "labels must lie in [0, 10), found 0..200", no file named.
    write_tiny_idx(tmp_path / "mnist")
    f = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[8 + 7] = 200  # sample 7
    f.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{f}: label 200 at sample 7 is outside 0..9")
    assert "1 of 30 labels out of range" in msg and "fedslim data verify" in msg


def test_out_of_range_cifar_batch_label_names_the_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(folder)
    p = folder / "data_batch_3"
    blob = pickle.loads(p.read_bytes(), encoding="bytes")
    blob[b"labels"][2] = 12
    p.write_bytes(pickle.dumps(blob, protocol=2))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path)
    assert str(e.value).startswith(f"{p}: label 12 at sample 2 is outside 0..9")


@pytest.mark.parametrize(("fraction", "says"), [(0.001, "leaves 2 test samples"),
                                                 (0.995, "leaves 8 training samples")])
def test_digits_test_fraction_that_empties_a_class_names_the_field(fraction: float, says: str) -> None:
    # Before: scikit-learn's "The test_size = 2 should be greater or equal to the number of classes = 10".
    with pytest.raises(ValueError, match=rf"^data.options.test_fraction: {fraction} {says} of digits' 1797, "
                                         r"fewer than its 10 classes \(the split is stratified\); use 0.0056 to "
                                         r"0.9944$"):
        load_dataset("digits", options={"test_fraction": fraction})
    b = load_dataset("digits", options={"test_fraction": 0.0056})  # the limit works
    assert len(b.test) == 11 and len(np.unique(b.test.y.numpy())) == 10


def test_synthetic_sample_count_error_names_the_option() -> None:
    # Before: "data.options.num_samples and test_samples: must be >= 1" whichever was wrong.
    with pytest.raises(ValueError, match=r"^data.options.test_samples: must be >= 1, got 0$"):
        load_dataset("synthetic", options={"test_samples": 0})
