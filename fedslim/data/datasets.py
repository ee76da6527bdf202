"""Registered dataset loaders: name -> ``load(root, options) -> DatasetBundle``.

Each split is held in memory as two tensors: features float32 NCHW normalised with fixed
per-dataset statistics (computed on the original training set, so every run and every client sees
the same transform), labels int64. :func:`load_dataset` is the entry point: it resolves the data
folder, validates ``data.options`` against the loader's declared options and applies the subsets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedslim.data import formats
from fedslim.data.formats import DataError
from fedslim.data.types import DatasetBundle, TensorData
from fedslim.registry import DATASETS
from fedslim.rng import np_gen

Loader = Callable[[Path | None, dict[str, Any]], DatasetBundle]

# (mean, std) per channel of the [0, 1]-scaled training pixels.
NORM_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3053,), (0.3760,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

# Bumped when the cache layout changes, so an old cache is rebuilt rather than misread.
_CACHE_VERSION = 2


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """The data folder: the argument, else ``$FEDSLIM_DATA``, else ``./data``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get("FEDSLIM_DATA")
    return Path(env).expanduser() if env else Path("data")


def _register(name: str, doc: str, options: dict[str, Any]) -> Callable[[Loader], Loader]:
    """Register a loader together with its options and their defaults (used for validation)."""

    def deco(fn: Loader) -> Loader:
        fn.options = dict(options)  # type: ignore[attr-defined]
        DATASETS.register(name, doc)(fn)
        return fn

    return deco


def dataset_options(name: str) -> dict[str, Any]:
    """The options dataset ``name`` accepts, with their defaults."""
    return dict(getattr(DATASETS.get(name, field="data.dataset"), "options", {}))


def _check_option(name: str, key: str, value: Any, default: Any) -> Any:
    where = f"data.options.{key}"
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
    elif isinstance(default, list | tuple) and not isinstance(value, list | tuple):
        raise ValueError(f"{where}: expected a list, got {value!r}")
    return value


def validate_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults merged with ``options``; an unknown key or a wrongly typed value is a ValueError."""
    allowed = dataset_options(name)
    merged = dict(allowed)
    for key, value in (options or {}).items():
        if key not in allowed:
            names = ", ".join(sorted(allowed)) or "(none)"
            raise ValueError(f"data.options.{key}: unknown option for dataset '{name}'; allowed: {names}")
        merged[key] = _check_option(name, key, value, allowed[key])
    return merged


def _take(split: TensorData, n: int | None, field: str, name: str) -> TensorData:
    if n is None:
        return split
    if n > len(split):
        raise ValueError(f"{field}={n} exceeds the {len(split)} samples of dataset '{name}'")
    # Clone, so the full-size tensors are freed instead of kept alive behind a view.
    return TensorData(split.x[:n].clone(), split.y[:n].clone())


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    options: dict[str, Any] | None = None,
) -> DatasetBundle:
    """Load dataset ``name`` (see ``fedslim data list``) into memory.

    ``train_subset`` / ``test_subset`` keep the first N samples of a split (image-folder datasets are
    stored in a fixed shuffled order, so the first N are a class-mixed sample).
    """
    loader = DATASETS.get(name, field="data.dataset")
    opts = validate_options(name, options)
    bundle: DatasetBundle = loader(resolve_root(root), opts)
    bundle.train = _take(bundle.train, train_subset, "data.train_subset", name)
    bundle.test = _take(bundle.test, test_subset, "data.test_subset", name)
    return bundle


# ---------------------------------------------------------------------------------------------
# helpers


def to_features(x: np.ndarray, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 scaled to [0, 1], then normalised per channel when stats given."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    if mean is None or std is None:
        return t.div_(255.0)
    shape = (1, -1) + (1,) * (t.dim() - 2)
    m = torch.tensor(mean, dtype=torch.float64).view(shape)
    s = torch.tensor(std, dtype=torch.float64).view(shape)
    # (x/255 - m)/s as one scale and one shift: two passes over the data instead of three.
    return t.mul_((1.0 / (255.0 * s)).float()).add_((-m / s).float())


def _bundle(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
            classes: list[str], stats: tuple[tuple[float, ...], tuple[float, ...]] | None) -> DatasetBundle:
    mean, std = stats if stats is not None else (None, None)
    tr = TensorData(to_features(train[0], mean, std), torch.from_numpy(train[1].astype(np.int64)))
    te = TensorData(to_features(test[0], mean, std), torch.from_numpy(test[1].astype(np.int64)))
    return DatasetBundle(name=name, train=tr, test=te, num_classes=len(classes),
                         input_shape=tuple(tr.x.shape[1:]), class_names=list(classes))


def check_labels(y: np.ndarray, num_classes: int, where: Path | str) -> None:
    """Refuse labels outside 0..num_classes-1, naming the file, the first bad sample and its value.

    A corrupt labels file can hold any byte; loaded as it is, the first out-of-range label would only
    surface later as a crash in the partition report or the loss, with no file named.
    """
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{where}: label {int(y[i])} at sample {i} is outside 0..{num_classes - 1} "
                        f"({len(bad)} of {len(y)} labels out of range); the file is corrupt or from another "
                        f"dataset (`fedslim data verify` checks a dataset's files against the known checksums)")


def _download_hint(name: str) -> str:
    return f"download it with `fedslim data download {name} --to DIR` and pass --data-dir DIR"


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 NCHW images scaled to [0, 1] (for image folders).

    From a 256-bin histogram per channel: exact, and no float copy of the whole split.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        p = counts / counts.sum()
        mean = float(p @ values)
        means.append(mean)
        stds.append(max(float(p @ (values - mean) ** 2), 1e-12) ** 0.5)
    return tuple(means), tuple(stds)


# ---------------------------------------------------------------------------------------------
# digits


@_register("digits", "sklearn's bundled 8x8 digits (1797 images, 10 classes); no download",
           {"test_fraction": 0.2, "split_seed": 0})
def load_digits(root: Path | None, options: dict[str, Any]) -> DatasetBundle:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    frac = options["test_fraction"]
    if not 0.0 < frac < 1.0:
        raise ValueError(f"data.options.test_fraction: must be in (0, 1), got {frac}")
    d = sk_digits()
    # Digits are 0..16 intensities; rescale to the same 0..255 range as the image datasets.
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    # The split is stratified: each side needs a sample of every class (else scikit-learn refuses, naming
    # no field). It takes ceil(frac * N) test samples.
    n, k = len(y), len(np.unique(y))
    n_test = math.ceil(frac * n)
    if n_test < k or n - n_test < k:
        side, m = ("test", n_test) if n_test < k else ("training", n - n_test)
        raise ValueError(f"data.options.test_fraction: {frac} leaves {m} {side} samples of digits' {n}, fewer "
                         f"than its {k} classes (the split is stratified); use {k / n:.4f} to "
                         f"{(n - k) / n:.4f}")
    tr, te = train_test_split(np.arange(len(y)), test_size=frac, stratify=y,
                              random_state=options["split_seed"])
    return _bundle("digits", (x[tr], y[tr]), (x[te], y[te]), [str(i) for i in range(10)], NORM_STATS["digits"])


# ---------------------------------------------------------------------------------------------
# MNIST family (IDX)

_IDX_DIRS = {
    "mnist": ["mnist", "MNIST/raw", "MNIST"],
    "fmnist": ["fashion-mnist", "fmnist", "FashionMNIST/raw", "FashionMNIST", "fashion_mnist"],
}
# Debian's dataset-fashion-mnist package installs here.
_SYSTEM_DIRS = {"fmnist": [Path("/usr/share/datasets/fashion-mnist")]}


def _idx_variants(base: str) -> list[str]:
    dotted = base.replace("-idx", ".idx")  # some mirrors (Kaggle) spell it train-images.idx3-ubyte
    return [base + ".gz", base, dotted + ".gz", dotted]


def idx_search_dirs(name: str, root: Path) -> list[Path]:
    # Dataset-named folders first: the root itself may hold the *other* MNIST-family dataset.
    return [root / sub for sub in _IDX_DIRS[name]] + [root] + _SYSTEM_DIRS.get(name, [])


def find_idx_files(name: str, root: Path) -> dict[str, Path]:
    """The four IDX files of ``name`` ('mnist' or 'fmnist') under ``root``; DataError if absent."""
    partial: tuple[Path, list[str]] | None = None
    dirs = idx_search_dirs(name, root)
    for d in dirs:
        if not d.is_dir():
            continue
        found: dict[str, Path] = {}
        for key, base in IDX_FILES.items():
            for v in _idx_variants(base):
                if (d / v).is_file():
                    found[key] = d / v
                    break
        if len(found) == len(IDX_FILES):
            return found
        if found and partial is None:
            partial = (d, [IDX_FILES[k] for k in IDX_FILES if k not in found])
    if partial is not None:
        d, missing = partial
        raise DataError(f"{d / missing[0]}[.gz]: file not found (the other {name} files are in {d}); "
                        + _download_hint(name))
    looked = ", ".join(str(d) for d in dirs)
    raise DataError(f"dataset '{name}' not found: looked for {IDX_FILES['train_x']}[.gz] etc. in {looked}; "
                    + _download_hint(name))


def _known_label_hashes() -> dict[str, str]:
    """Content SHA-256 of each dataset's train labels (tells MNIST from Fashion-MNIST)."""
    from fedslim.data.download import load_checksums

    out = {}
    for ds in ("mnist", "fmnist"):
        entry = load_checksums()[ds]["files"].get(IDX_FILES["train_y"] + ".gz", {})
        if "sha256" in entry:
            out[ds] = entry["sha256"]
    return out


def _load_idx(name: str, root: Path | None, options: dict[str, Any], classes: list[str]) -> DatasetBundle:
    files = find_idx_files(name, resolve_root(root))
    label_bytes = formats.read_maybe_gzip(files["train_y"])
    digest = hashlib.sha256(label_bytes).hexdigest()
    for other, h in _known_label_hashes().items():
        if other != name and h == digest:
            raise DataError(f"{files['train_y']}: these are the {other} labels, not {name}; "
                            f"point the data folder at the {name} files")
    ytr = formats.parse_idx(label_bytes, files["train_y"], formats.IDX_LABELS)
    xtr = formats.read_idx_images(files["train_x"])
    xte = formats.read_idx_images(files["test_x"])
    yte = formats.read_idx_labels(files["test_y"])
    for xf, yf, x, y in (("train_x", "train_y", xtr, ytr), ("test_x", "test_y", xte, yte)):
        if len(x) != len(y):
            raise DataError(f"{files[yf]}: {len(y)} labels but {files[xf].name} has {len(x)} images")
        check_labels(y, len(classes), files[yf])
    stats = NORM_STATS[name] if options["normalize"] else None
    return _bundle(name, (xtr[:, None], ytr), (xte[:, None], yte), classes, stats)


@_register("mnist", "MNIST handwritten digits, 28x28 grey, 60000/10000 (IDX files)", {"normalize": True})
def load_mnist(root: Path | None, options: dict[str, Any]) -> DatasetBundle:
    return _load_idx("mnist", root, options, [str(i) for i in range(10)])


@_register("fmnist", "Fashion-MNIST, 28x28 grey, 60000/10000 (IDX files)", {"normalize": True})
def load_fmnist(root: Path | None, options: dict[str, Any]) -> DatasetBundle:
    return _load_idx("fmnist", root, options, FMNIST_CLASSES)


# ---------------------------------------------------------------------------------------------
# image folders (with a decoded-array cache)


def user_cache_dir() -> Path | None:
    """Where decoded-image caches go: ``$XDG_CACHE_HOME/fedslim``, else ``~/.cache/fedslim``.

    Never the data folder: data folders are treated as read-only (they may be shared between users
    or mounted read-only). None when there is no home folder to put it in.
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative path
        return Path(xdg) / "fedslim"
    try:
        return Path.home() / ".cache" / "fedslim"
    except RuntimeError:
        return None


def cache_path(source: Path, shuffle: bool) -> Path | None:
    """The decoded-array cache of an image tree or archive, in :func:`user_cache_dir`.

    Named after the source's resolved path, so two data folders never share a cache; whether the
    cache still matches the source's files is checked against the signature stored inside it.
    """
    base = user_cache_dir()
    if base is None:
        return None
    resolved = source.resolve()
    key = hashlib.sha256(f"{resolved}\0shuffle={int(shuffle)}".encode()).hexdigest()[:20]
    return base / "images" / f"{resolved.name}-{key}.npz"


def _digest(parts: list[tuple[Any, ...]]) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _tree_signature(tree: Path, shuffle: bool) -> tuple[str, int]:
    """(digest, newest mtime) of the tree's ``<split>/<class>/<file>`` names, sizes and mtimes.

    Adding, removing, renaming or rewriting a file changes the digest. One ``stat`` per file: about
    0.4 s for CIFAR-10's 60,000 files, against some 12 s to decode them.
    """
    parts: list[tuple[Any, ...]] = [("version", _CACHE_VERSION), ("tree", str(tree.resolve())),
                                    ("shuffle", int(shuffle))]
    newest = tree.stat().st_mtime_ns
    for split in sorted(p for p in tree.iterdir() if p.is_dir()):
        for c in sorted(p for p in split.iterdir() if p.is_dir()):
            with os.scandir(c) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                st = e.stat()
                parts.append((f"{split.name}/{c.name}/{e.name}", st.st_size, st.st_mtime_ns))
                newest = max(newest, st.st_mtime_ns)
            newest = max(newest, c.stat().st_mtime_ns)
    return _digest(parts), newest


def _archive_signature(archive: Path, shuffle: bool) -> tuple[str, int]:
    st = archive.stat()
    parts: list[tuple[Any, ...]] = [("version", _CACHE_VERSION), ("archive", str(archive.resolve())),
                                    ("shuffle", int(shuffle)), ("stat", st.st_size, st.st_mtime_ns)]
    return _digest(parts), st.st_mtime_ns


Splits = dict[str, tuple[np.ndarray, np.ndarray, list[str]]]


def _read_cache(path: Path, signature: str) -> Splits | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != _CACHE_VERSION or str(z["signature"]) != signature:
                return None
            classes = [str(c) for c in z["classes"]]
            return {s: (z[f"{s}_x"], z[f"{s}_y"], classes) for s in ("train", "test") if f"{s}_x" in z}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # unreadable cache: rebuild it


def _write_cache(path: Path, splits: Splits, signature: str) -> None:
    """Write the cache atomically; skipped quietly when the cache folder cannot be made or written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    if not os.access(path.parent, os.W_OK):
        return
    arrays: dict[str, np.ndarray] = {"version": np.array(_CACHE_VERSION), "signature": np.array(signature),
                                     "classes": np.array(splits["train"][2])}
    for s, (x, y, _) in splits.items():
        arrays[f"{s}_x"], arrays[f"{s}_y"] = x, y
    try:
        with formats.atomic_output(path) as tmp:
            # Uncompressed: loading a compressed cache costs as much as a good part of decoding.
            np.savez(tmp, **arrays)  # type: ignore[arg-type]
    except OSError as e:
        warnings.warn(f"could not write the decoded-image cache {path} ({e}); images are decoded every load",
                      stacklevel=3)


def _cached(cpath: Path | None, signature: str, newest: int) -> Splits | None:
    # Older than a source file: written before that file's last change within the clock's resolution.
    if cpath is None or not cpath.is_file() or cpath.stat().st_mtime_ns < newest:
        return None
    got = _read_cache(cpath, signature)
    return got if got is not None and "train" in got and "test" in got else None


def read_image_tree(tree: Path, *, cache: bool, shuffle: bool = False) -> Splits:
    """``tree/{train,test}/<class>/<image>`` -> per split (x uint8 NCHW, y, classes).

    ``shuffle`` applies the fixed sample order of :func:`_fixed_order` before caching, so a cached
    load does not pay for the reordering.

    With ``cache``, the decoded arrays are kept in :func:`cache_path` (in the user's cache folder,
    never beside the data) and reused while every file of the tree has the name, size and mtime it
    had when the cache was written.
    """
    for split in ("train", "test"):
        if not (tree / split).is_dir():
            raise DataError(f"{tree / split}: folder not found (expected {tree}/{{train,test}}/<class>/<image>)")

    def decode() -> Splits:
        xtr, ytr, classes = formats.read_image_folder(tree / "train")
        xte, yte, _ = formats.read_image_folder(tree / "test", classes)
        if xtr.shape[1:] != xte.shape[1:]:
            raise DataError(f"{tree / 'test'}: images are {xte.shape[1:]} (C, H, W) but the training images "
                            f"are {xtr.shape[1:]}")
        return _fixed_order({"train": (xtr, ytr, classes), "test": (xte, yte, classes)}, shuffle)

    return _through_cache(tree, shuffle, cache, _tree_signature, decode)


def read_image_archive(archive: Path, top: str, *, cache: bool, shuffle: bool = False) -> Splits:
    """The ``top/{train,test}/<class>/<image>`` tree inside a tarball, decoded in one streaming pass.

    Not unpacked first: writing 60,000 small files took 20 s to over 2 minutes on our test machines,
    streaming them takes 3 s. The cache (see :func:`cache_path`) is tied to the archive's resolved
    path, size and mtime.
    """

    def decode() -> Splits:
        splits = formats.read_image_tar(archive, top)
        if "test" not in splits:
            raise DataError(f"{archive}: no {top}/test/<class>/<image> entries in the archive")
        splits = _fixed_order({s: splits[s] for s in ("train", "test")}, shuffle)
        if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
            raise DataError(f"{archive}: test images are {splits['test'][0].shape[1:]} (C, H, W) but the "
                            f"training images are {splits['train'][0].shape[1:]}")
        return splits

    return _through_cache(archive, shuffle, cache, _archive_signature, decode)


def _through_cache(source: Path, shuffle: bool, cache: bool, signature: Callable[[Path, bool], tuple[str, int]],
                   decode: Callable[[], Splits]) -> Splits:
    """``decode()``, or its result cached for ``source`` while ``signature`` still matches."""
    cpath = cache_path(source, shuffle) if cache else None
    if cpath is None:
        return decode()
    sig, newest = signature(source, shuffle)
    if (got := _cached(cpath, sig, newest)) is not None:
        return got
    splits = decode()
    _write_cache(cpath, splits, sig)
    return splits


def _fixed_order(splits: Splits, shuffle: bool) -> Splits:
    """A fixed (seed-independent) shuffle: folders list samples class by class, so without it the
    first N of a split would all be one class."""
    if not shuffle:
        return splits
    out = {}
    for s, (x, y, classes) in splits.items():
        perm = np_gen(0, f"imagefolder-order-{s}").permutation(len(y))
        out[s] = (x[perm], y[perm], classes)
    return out


@_register("imagefolder", "any {train,test}/<class>/<image> tree (option path, else data.root)",
           {"path": None, "cache": False, "shuffle": True, "normalize": True})
def load_imagefolder(root: Path | None, options: dict[str, Any]) -> DatasetBundle:
    tree = Path(options["path"]).expanduser() if options["path"] else resolve_root(root)
    if not tree.is_dir():
        raise DataError(f"{tree}: image folder not found (set data.options.path or data.root to a folder "
                        "holding train/<class>/<image> and test/<class>/<image>)")
    splits = read_image_tree(tree, cache=options["cache"], shuffle=options["shuffle"])
    xtr, ytr, classes = splits["train"]
    stats = channel_stats(xtr) if options["normalize"] else None
    return _bundle("imagefolder", (xtr, ytr), splits["test"][:2], classes, stats)


# ---------------------------------------------------------------------------------------------
# CIFAR-10

_CIFAR_PICKLE_DIR = "cifar-10-batches-py"
_CIFAR_PICKLE_TAR = "cifar-10-python.tar.gz"
_CIFAR_JPEG_DIR = "cifar10-jpeg"
_CIFAR_JPEG_TAR = "cifar10-jpeg.tar.gz"
_CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def _cifar_from_batches(read: Callable[[str], bytes], where: Callable[[str], Path]) -> Splits:
    xs, ys = [], []
    for b in _CIFAR_BATCHES:
        x, y = formats.parse_cifar_batch(read(b), where(b))
        xs.append(x)
        ys.append(y)
    xte, yte = formats.parse_cifar_batch(read("test_batch"), where("test_batch"))
    classes = CIFAR10_CLASSES
    try:
        meta = formats.parse_cifar_meta(read("batches.meta"), where("batches.meta"))
        classes = meta or classes
    except KeyError:
        pass  # batches.meta is optional: the standard class names apply
    for b, y in zip([*_CIFAR_BATCHES, "test_batch"], [*ys, yte], strict=True):
        check_labels(y, len(classes), where(b))
    return {"train": (np.concatenate(xs), np.concatenate(ys), classes), "test": (xte, yte, classes)}


def _read_cifar_dir(d: Path) -> Splits:
    def read(name: str) -> bytes:
        p = d / name
        try:
            return p.read_bytes()
        except FileNotFoundError:
            if name == "batches.meta":
                raise KeyError(name) from None
            raise DataError(f"{p}: file not found (a CIFAR-10 batch folder holds data_batch_1..5 and "
                            f"test_batch); {_download_hint('cifar10')}") from None

    return _cifar_from_batches(read, lambda n: d / n)


def _read_cifar_tar(archive: Path) -> Splits:
    data: dict[str, bytes] = {}
    for name, blob in formats.iter_tar_files(archive):
        if name.startswith(_CIFAR_PICKLE_DIR + "/"):
            data[name.split("/", 1)[1]] = blob
    missing = [n for n in [*_CIFAR_BATCHES, "test_batch"] if n not in data]
    if missing:
        raise DataError(f"{archive}: archive has no member {_CIFAR_PICKLE_DIR}/{missing[0]}")

    def read(name: str) -> bytes:
        if name not in data:
            raise KeyError(name)
        return data[name]

    return _cifar_from_batches(read, lambda n: Path(f"{archive}:{_CIFAR_PICKLE_DIR}/{n}"))


def _unpack_or_none(archive: Path, top: str) -> Path | None:
    """Unpack next to the archive once; None when that folder is read-only."""
    try:
        return formats.extract_tar_once(archive, archive.parent, top)
    except PermissionError:
        return None


CIFAR10_SPLIT_SIZES = {"train": 50000, "test": 10000}
_CIFAR_BATCH_SIZE = 10000
CIFAR10_FORMS = {
    "pickle-dir": "pickled batches folder",
    "pickle-tar": "pickled batches archive",
    "jpeg-dir": "JPEG image-folder tree",
    "jpeg-tar": "JPEG image-folder archive",
}


def find_cifar10(root: str | os.PathLike[str] | None, source: str = "auto") -> tuple[str, Path]:
    """(form, path) of the CIFAR-10 copy the loader reads: a key of :data:`CIFAR10_FORMS` and its path.

    In ``root``, ``root/cifar10`` and ``root/CIFAR10``: the original pickled batches first (lossless),
    folder before archive; then the JPEG tree, folder before archive. ``source`` 'pickle' or 'jpeg'
    restricts the search to one kind. DataError naming every place looked in when there is none.
    """
    if source not in ("auto", "pickle", "jpeg"):
        raise ValueError(f"data.options.source: must be one of auto, pickle, jpeg (got {source!r})")
    base = resolve_root(root)
    dirs = [base, base / "cifar10", base / "CIFAR10"]
    kinds = {"auto": ["pickle", "jpeg"], "pickle": ["pickle"], "jpeg": ["jpeg"]}[source]
    layout = {"pickle": (_CIFAR_PICKLE_DIR, _CIFAR_PICKLE_TAR), "jpeg": (_CIFAR_JPEG_DIR, _CIFAR_JPEG_TAR)}
    for kind in kinds:
        folder, archive = layout[kind]
        for d in dirs:
            if (d / folder).is_dir():
                return f"{kind}-dir", d / folder
            if (d / archive).is_file():
                return f"{kind}-tar", d / archive
    wanted = [name for kind in kinds for name in (layout[kind][0] + "/", layout[kind][1])]
    raise DataError(f"dataset 'cifar10' not found: looked for {', '.join(wanted)} in "
                    f"{', '.join(str(d) for d in dirs)}; {_download_hint('cifar10')}")


@_register("cifar10", "CIFAR-10, 32x32 RGB, 50000/10000: pickled batches, or the JPEG image-folder tree",
           {"source": "auto", "cache": True, "normalize": True})
def load_cifar10(root: Path | None, options: dict[str, Any]) -> DatasetBundle:
    base = resolve_root(root)
    form, path = find_cifar10(base, options["source"])
    if form == "pickle-dir":
        splits = _read_cifar_dir(path)
    elif form == "pickle-tar":
        tree = _unpack_or_none(path, _CIFAR_PICKLE_DIR)
        splits = _read_cifar_dir(tree) if tree else _read_cifar_tar(path)
    elif form == "jpeg-dir":
        splits = read_image_tree(path, cache=options["cache"], shuffle=True)
    else:
        splits = read_image_archive(path, _CIFAR_JPEG_DIR, cache=options["cache"], shuffle=True)
    xtr, ytr, classes = splits["train"]
    if xtr.shape[1:] != (3, 32, 32):
        raise DataError(f"{base}: CIFAR-10 images should be 32x32 RGB, found {xtr.shape[1:]} (C, H, W)")
    stats = NORM_STATS["cifar10"] if options["normalize"] else None
    return _bundle("cifar10", (xtr, ytr), splits["test"][:2], classes, stats)


# ---------------------------------------------------------------------------------------------
# verify (``fedslim data verify``)

VerifyResult = tuple[Path, bool, str]


def verify_cifar10(root: str | os.PathLike[str] | None, source: str = "auto") -> list[VerifyResult]:
    """Check the CIFAR-10 copy :func:`load_cifar10` would read (see :func:`find_cifar10`).

    (path, ok, message) per item; the first names the form found. Archives are checked against the
    known checksums; a JPEG tree has no published hashes, so each class folder is checked for its
    image count and every image is decoded (about 10 s for the 60,000); pickled batches are parsed
    and counted. DataError when there is no copy at all.
    """
    form, path = find_cifar10(root, source)
    what = f"{CIFAR10_FORMS[form]} (the copy the cifar10 loader reads)"
    if form in ("pickle-tar", "jpeg-tar"):
        return [_verify_archive(path, what)]
    if form == "pickle-dir":
        return _verify_cifar_batches(path, what)
    return _verify_cifar_jpeg_tree(path, what)


def _verify_archive(path: Path, what: str) -> VerifyResult:
    from fedslim.data.download import check_file, load_checksums

    specs = [e["files"][path.name] for e in load_checksums().values() if path.name in e["files"]]
    if not specs:
        return path, False, f"{what}: no known checksum for {path.name}"
    try:
        ok, msg = check_file(path, specs[0])
    except OSError as e:
        ok, msg = False, f"cannot read ({e.strerror or e})"
    return path, ok, f"{what}: {msg}"


def _verify_cifar_batches(folder: Path, what: str) -> list[VerifyResult]:
    names = [*_CIFAR_BATCHES, "test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    head = f"{what}: " + (f"missing {', '.join(missing)}" if missing else "data_batch_1..5 and test_batch present")
    out: list[VerifyResult] = [(folder, not missing, head)]
    for n in names:
        p = folder / n
        try:
            x, y = formats.read_cifar_batch(p)
        except DataError as e:
            out.append((p, False, str(e).removeprefix(f"{p}: ")))
            continue
        problems = []
        if len(x) != _CIFAR_BATCH_SIZE:
            problems.append(f"{len(x)} images, expected {_CIFAR_BATCH_SIZE}")
        if len(y) and (y.min() < 0 or y.max() >= len(CIFAR10_CLASSES)):
            problems.append(f"labels {y.min()}..{y.max()}, expected 0..{len(CIFAR10_CLASSES) - 1}")
        out.append((p, not problems, "; ".join(problems) or f"{len(x)} images, labels in 0..9"))
    meta = folder / "batches.meta"
    if meta.is_file():  # optional, but the loader takes the class names from it when present
        try:
            got = formats.parse_cifar_meta(meta.read_bytes(), meta)
            ok = got is None or got == CIFAR10_CLASSES
            msg = "class names ok" if ok else f"class names {got}, expected {CIFAR10_CLASSES}"
        except DataError as e:
            ok, msg = False, str(e).removeprefix(f"{meta}: ")
        out.append((meta, ok, msg))
    return out


def _verify_cifar_jpeg_tree(tree: Path, what: str) -> list[VerifyResult]:
    problems: list[str] = []
    splits = []
    for split in CIFAR10_SPLIT_SIZES:
        if not (tree / split).is_dir():
            problems.append(f"{split}/ folder not found")
            continue
        splits.append(split)
        extra = sorted(p.name for p in (tree / split).iterdir()
                       if p.is_dir() and not p.name.startswith(".") and p.name not in CIFAR10_CLASSES)
        problems.extend(f"unexpected class folder {split}/{c}" for c in extra)
    if problems:
        head = (f"{what}: {'; '.join(problems)} (expected {{train,test}}/<class>/ for the classes "
                f"{', '.join(CIFAR10_CLASSES)})")
    else:
        head = f"{what}: train/ and test/ hold the {len(CIFAR10_CLASSES)} CIFAR-10 class folders"
    out: list[VerifyResult] = [(tree, not problems, head)]
    for split in splits:
        per_class = CIFAR10_SPLIT_SIZES[split] // len(CIFAR10_CLASSES)
        for c in CIFAR10_CLASSES:
            ok, msg = formats.check_image_class(tree / split / c, per_class, (3, 32, 32))
            out.append((tree / split / c, ok, msg))
    return out


# ---------------------------------------------------------------------------------------------
# synthetic


@_register("synthetic", "seeded Gaussian class blobs shaped as images; for tests (no files)",
           {"num_samples": 1000, "test_samples": 200, "num_classes": 10, "shape": [1, 8, 8],
            "separation": 0.5, "seed": 0})
def load_synthetic(root: Path | None, options: dict[str, Any]) -> DatasetBundle:
    n, n_test, k = options["num_samples"], options["test_samples"], options["num_classes"]
    shape = tuple(options["shape"])
    for key in ("num_samples", "test_samples"):
        if options[key] < 1:
            raise ValueError(f"data.options.{key}: must be >= 1, got {options[key]}")
    if k < 2:
        raise ValueError(f"data.options.num_classes: must be >= 2, got {k}")
    if not 1 <= len(shape) <= 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"data.options.shape: expected 1 to 3 positive integers, got {list(shape)}")
    rng = np_gen(options["seed"], "synthetic-data")
    dim = int(np.prod(shape))
    # Per-pixel centre spread `separation` puts class means ~ separation*sqrt(2*dim) noise-sigmas apart.
    centres = rng.normal(0.0, options["separation"], size=(k, dim)).astype(np.float32)

    def draw(m: int) -> TensorData:
        y = rng.permutation(np.arange(m) % k)
        x = centres[y] + rng.standard_normal((m, dim), dtype=np.float32)
        return TensorData(torch.from_numpy(x.reshape((m, *shape))), torch.from_numpy(y.astype(np.int64)))

    train, test = draw(n), draw(n_test)
    return DatasetBundle(name="synthetic", train=train, test=test, num_classes=k, input_shape=shape,
                         class_names=[str(i) for i in range(k)])
