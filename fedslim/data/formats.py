"""Readers for the standard on-disk dataset formats: IDX (MNIST family), pickled CIFAR batches,
image-folder trees and tarballs of either. Everything returns raw ``uint8`` arrays; normalisation is
the loaders' business (:mod:`fedslim.data.datasets`).

Every way a file can be wrong (missing, truncated, wrong magic, corrupt gzip or pickle, odd image)
ends in one :class:`DataError` whose message starts with the file's path and says what was expected.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import secrets
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

IDX_IMAGES = 0x00000803  # unsigned bytes, 3 dims
IDX_LABELS = 0x00000801  # unsigned bytes, 1 dim
_IDX_KIND = {IDX_IMAGES: "IDX images", IDX_LABELS: "IDX labels"}
_GZIP_MAGIC = b"\x1f\x8b"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(ValueError):
    """A dataset file that is missing or not what it should be; the message names the file."""


# ---------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Readers (another process, a crashed run resumed) therefore see either the old file or the whole
    new one, never a half-written one. The suffix is kept so writers that infer a format from it
    (numpy, matplotlib) behave; the writer creates the file, so it gets the usual umask permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# IDX


def read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is a gzip stream (decided by content, not the name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] != _GZIP_MAGIC:
        if path.suffix == ".gz":
            raise DataError(f"{path}: not a gzip file (expected a gzip stream because of the .gz name)")
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from None


def parse_idx(data: bytes, path: Path, expected_magic: int) -> np.ndarray:
    """Parse an unsigned-byte IDX buffer (header: magic, then one big-endian uint32 per dimension)."""
    kind = _IDX_KIND[expected_magic]
    if len(data) < 4:
        raise DataError(f"{path}: truncated: {len(data)} bytes, too short for an IDX header ({kind})")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: wrong magic 0x{magic:08x}, expected 0x{expected_magic:08x} ({kind})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated: expected a {header}-byte header, found {len(data)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing data"
        raise DataError(f"{path}: {what}: expected {expected} bytes for dims {dims}, found {len(data)}")
    # A copy, so the array owns writable memory instead of pinning the immutable bytes object.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    return parse_idx(read_maybe_gzip(path), path, expected_magic)


def read_idx_images(path: Path) -> np.ndarray:
    """(N, H, W) uint8."""
    return read_idx(path, IDX_IMAGES)


def read_idx_labels(path: Path) -> np.ndarray:
    """(N,) uint8."""
    return read_idx(path, IDX_LABELS)


# ---------------------------------------------------------------------------------------------
# pickled CIFAR batches


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only.

    The CIFAR format is a pickle, and unpickling runs arbitrary code by design; allowing only the
    globals a numpy array needs means a hostile file fails with an error instead of running.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(data: bytes, path: Path) -> object:
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: corrupt or unsupported pickle ({type(e).__name__}: {e})") from None


def _key(d: dict, name: str) -> object:
    # Python 2 pickles (the original CIFAR files) have bytes keys; re-pickled copies have str keys.
    return d.get(name.encode(), d.get(name))


def parse_cifar_batch(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch -> x (N, 3, 32, 32) uint8, y (N,) int64."""
    obj = _unpickle(data, path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict with 'data' and 'labels', got {type(obj).__name__}")
    x, y = _key(obj, "data"), _key(obj, "labels")
    if y is None:
        y = _key(obj, "fine_labels")  # CIFAR-100 spelling, same layout
    if x is None or y is None:
        raise DataError(f"{path}: expected keys 'data' and 'labels' in the pickled batch")
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected 'data' as uint8 (N, 3072), got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],):
        raise DataError(f"{path}: {x.shape[0]} images but {y.shape[0]} labels")
    # Rows are channel-planar (1024 red, 1024 green, 1024 blue), each plane row-major: already NCHW.
    return x.reshape(-1, 3, 32, 32), y


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    return parse_cifar_batch(data, path)


def parse_cifar_meta(data: bytes, path: Path) -> list[str] | None:
    """Class names from a ``batches.meta`` pickle (None when it holds none)."""
    obj = _unpickle(data, path)
    names = _key(obj, "label_names") if isinstance(obj, dict) else None
    if not isinstance(names, list):
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


# ---------------------------------------------------------------------------------------------
# images


def decode_image(data: bytes | Path, where: str) -> np.ndarray:
    """One image -> (C, H, W) uint8 with C = 1 for grey ('L'/'1'/'I;16'...) and 3 for colour."""
    from PIL import Image, UnidentifiedImageError

    try:
        src = data if isinstance(data, Path) else io.BytesIO(data)
        with Image.open(src) as im:
            if im.mode in ("L", "RGB"):
                arr = np.asarray(im)
            elif im.mode in ("1", "I", "I;16", "F", "LA"):
                arr = np.asarray(im.convert("L"))
            else:
                arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: cannot decode image ({e})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _stack(images: list[np.ndarray], names: list[str]) -> np.ndarray:
    """Stack equally shaped images; a different shape is an error naming the first odd file."""
    if not images:
        return np.empty((0, 1, 1, 1), np.uint8)
    first = images[0].shape
    for arr, name in zip(images, names, strict=True):
        if arr.shape != first:
            raise DataError(
                f"{name}: image is {_shape_text(arr.shape)}, expected {_shape_text(first)} like {names[0]}"
                " (image folders are not resized: all images must share one size and mode)"
            )
    return np.stack(images)


def _shape_text(shape: tuple[int, ...]) -> str:
    c, h, w = shape
    return f"{w}x{h} with {c} channel{'s' if c != 1 else ''}"


def list_image_folder(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sub-folders sorted by name) and (file, class index) in sorted order."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder not found (expected <split>/<class>/<image>)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir}: no class folders (expected <split>/<class>/<image>)")
    files: list[tuple[Path, int]] = []
    for ci, c in enumerate(classes):
        files.extend((split_dir / c / n, ci) for n in image_names(split_dir / c))
    return classes, files


def image_names(folder: Path) -> list[str]:
    """Sorted names of the image files directly in ``folder`` (by suffix; hidden files skipped)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it
                      if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith("."))


def check_image_class(folder: Path, expected_count: int | None, expected_shape: tuple[int, int, int] | None,
                      max_listed: int = 3) -> tuple[bool, str]:
    """Decode every image of one class folder: (ok, message) for a verify report, never raises.

    Problems checked: folder missing or unreadable, image count other than ``expected_count``, an
    image that does not decode, an image whose (C, H, W) is not ``expected_shape``. The message
    names the first ``max_listed`` bad images.
    """
    if not folder.is_dir():
        want = _images(expected_count) if expected_count is not None else "images"
        return False, f"class folder not found (expected {want} in it)"
    try:
        names = image_names(folder)
    except OSError as e:
        return False, f"cannot list the folder ({e.strerror or e})"
    problems: list[str] = []
    if expected_count is not None and len(names) != expected_count:
        problems.append(f"{_images(len(names))}, expected {expected_count}")
    bad: list[str] = []
    for n in names:
        try:
            shape = decode_image(folder / n, n).shape
        except DataError as e:
            bad.append(str(e))
            continue
        if expected_shape is not None and shape != expected_shape:
            bad.append(f"{n}: image is {_shape_text(shape)}, expected {_shape_text(expected_shape)}")
    if bad:
        listed = "; ".join(bad[:max_listed]) + ("; ..." if len(bad) > max_listed else "")
        problems.append(f"{len(bad)} of {len(names)} images unreadable or the wrong size: {listed}")
    if problems:
        return False, "; ".join(problems)
    size = f" as {_shape_text(expected_shape)}" if expected_shape is not None else ""
    return True, f"{_images(len(names))}, all decode{size}"


def _images(n: int) -> str:
    return f"{n} image{'s' if n != 1 else ''}"


def read_image_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``split_dir/<class>/<image>`` -> x (N, C, H, W) uint8, y (N,) int64, class names.

    ``classes`` pins the class order (the test split must use the train split's indices); a class
    folder missing from this split simply has no samples, an extra one is an error.
    """
    found, files = list_image_folder(split_dir)
    if classes is not None:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"{split_dir / extra[0]}: class folder not present in the training split")
        remap = [classes.index(c) for c in found]
        files = [(p, remap[ci]) for p, ci in files]
    else:
        classes = found
        # The training split defines the classes: a class with no image would still get an output unit
        # and a column in every per-class metric, never trained and never right.
        counts = np.bincount([ci for _, ci in files], minlength=len(classes))
        empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
        if empty and files:
            raise DataError(f"{split_dir}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
                            f"hold{'' if len(empty) > 1 else 's'} no image files ({', '.join(IMAGE_SUFFIXES)}); "
                            "every class folder of the training split needs at least one image (remove the "
                            "empty folder or add its images)")
    if not files:
        raise DataError(f"{split_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    images = [decode_image(p, str(p)) for p, _ in files]
    x = _stack(images, [str(p) for p, _ in files])
    y = np.fromiter((ci for _, ci in files), dtype=np.int64, count=len(files))
    return x, y, classes


def read_image_tar(archive: Path, top: str) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Decode an image-folder tree straight from a tarball (``top/<split>/<class>/<image>``).

    One sequential pass, no temporary files: far faster than unpacking thousands of small files.
    """
    raw: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    for member, data in iter_tar_files(archive):
        parts = member.split("/")
        if len(parts) != 4 or parts[0] != top or not parts[3].lower().endswith(IMAGE_SUFFIXES):
            continue
        raw.setdefault(parts[1], {}).setdefault(parts[2], []).append((member, data))
    if "train" not in raw:
        raise DataError(f"{archive}: no {top}/train/<class>/<image> entries in the archive")
    classes = sorted(raw["train"])
    out = {}
    for split, by_class in raw.items():
        extra = sorted(set(by_class) - set(classes))
        if extra:
            raise DataError(f"{archive}:{top}/{split}/{extra[0]}: class folder not present in the training split")
        items = [(name, data, classes.index(c)) for c in sorted(by_class)
                 for name, data in sorted(by_class[c])]
        x = _stack([decode_image(d, f"{archive}:{n}") for n, d, _ in items], [f"{archive}:{n}" for n, _, _ in items])
        y = np.array([ci for _, _, ci in items], dtype=np.int64)
        out[split] = (x, y, classes)
    return out


# ---------------------------------------------------------------------------------------------
# tarballs


def iter_tar_files(archive: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                if m.isfile():
                    f = tf.extractfile(m)
                    if f is not None:
                        yield m.name.removeprefix("./"), f.read()
    except FileNotFoundError:
        raise DataError(f"{archive}: file not found") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: corrupt or truncated archive ({e})") from None


def extract_tar_once(archive: Path, dest: Path, top: str) -> Path:
    """Unpack ``archive`` so that ``dest/top`` exists, exactly once and atomically.

    The archive is unpacked into a private temporary folder inside ``dest`` and its ``top`` folder
    renamed into place, so a crash or a concurrent loader never sees a half-unpacked tree. If another
    process got there first its tree is kept and ours discarded. Raises ``PermissionError`` when
    ``dest`` is not writable (the caller may then read the archive directly).
    """
    target = dest / top
    if target.is_dir():
        return target
    if not os.access(dest, os.W_OK):
        raise PermissionError(f"{dest}: not writable, cannot unpack {archive.name} here")
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{top}.unpack-"))
    try:
        try:
            with tarfile.open(archive, "r:*") as tf:
                # The 'data' filter refuses absolute paths, '..', links out of the tree and devices.
                tf.extractall(tmp, filter="data")
        except FileNotFoundError:
            raise DataError(f"{archive}: file not found") from None
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise DataError(f"{archive}: corrupt or truncated archive ({e})") from None
        except OSError as e:
            if isinstance(e, PermissionError):
                raise
            raise DataError(f"{archive}: corrupt or truncated archive ({e})") from None
        if not (tmp / top).is_dir():
            raise DataError(f"{archive}: expected the archive to contain a top folder '{top}/'")
        try:
            os.rename(tmp / top, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
