"""Download the standard dataset files, verified against ``checksums.json``, written atomically.

IDX files are verified by the SHA-256 of their *decompressed* content: mirrors re-gzip them, so the
``.gz`` bytes differ between mirrors while the IDX content does not. Archives are verified as files.
A file is downloaded to a ``.part`` file beside its destination, verified, then renamed into place;
a failed check deletes the part file, so a destination never holds an unverified file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from fedslim.data.formats import DataError

ALIASES = {"fashion-mnist": "fmnist", "fashion_mnist": "fmnist", "cifar-10": "cifar10"}
_CHUNK = 1 << 20
_USER_AGENT = "fedslim-data/0.1 (python urllib)"

Log = Callable[[str], None]


@lru_cache(maxsize=1)
def load_checksums() -> dict[str, Any]:
    data = json.loads((Path(__file__).with_name("checksums.json")).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def downloadable() -> list[str]:
    return sorted(load_checksums())


def _entry(name: str) -> tuple[str, dict[str, Any]]:
    canon = ALIASES.get(name, name)
    table = load_checksums()
    if canon not in table:
        raise DataError(f"no download for '{name}'; downloadable: {', '.join(downloadable())}")
    return canon, table[canon]


# ---------------------------------------------------------------------------------------------
# hashing


def _hash_stream(f: BinaryIO, algos: tuple[str, ...]) -> tuple[dict[str, str], int]:
    hs = {a: hashlib.new(a) for a in algos}
    n = 0
    while chunk := f.read(_CHUNK):
        n += len(chunk)
        for h in hs.values():
            h.update(chunk)
    return {a: h.hexdigest() for a, h in hs.items()}, n


def content_sha256(path: Path) -> tuple[str, int]:
    """SHA-256 and size of the file's content, gunzipped first when it is a gzip stream."""
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            digests, n = _hash_stream(f, ("sha256",))  # type: ignore[arg-type]
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from None
    return digests["sha256"], n


def check_file(path: Path, spec: dict[str, Any]) -> tuple[bool, str]:
    """(ok, message) for ``path`` against one checksums.json entry."""
    if spec["verify"] == "content":
        got, n = content_sha256(path)
        if got == spec["sha256"]:
            return True, f"sha256 of decompressed content ok ({n} bytes)"
        return False, (f"checksum mismatch (sha256 of decompressed content): expected {spec['sha256']}, "
                       f"got {got} ({n} bytes, expected {spec.get('size', '?')})")
    algos = tuple(a for a in ("sha256", "md5") if a in spec)
    with open(path, "rb") as f:
        digests, n = _hash_stream(f, algos)
    for a in algos:
        if digests[a] != spec[a]:
            return False, (f"checksum mismatch ({a} of the file): expected {spec[a]}, got {digests[a]} "
                           f"({n} bytes, expected {spec.get('size', '?')})")
    return True, f"{' and '.join(algos)} of the file ok ({n} bytes)"


# ---------------------------------------------------------------------------------------------
# download


def _url(mirror: str, fname: str) -> str:
    return mirror.rstrip("/") + "/" + fname


def _fetch(url: str, part: Path, timeout: float) -> int:
    req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    n = 0
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(part, "wb") as out:
        while chunk := resp.read(_CHUNK):
            out.write(chunk)
            n += len(chunk)
        expected = resp.headers.get("Content-Length")
    if expected is not None and expected.isdigit() and int(expected) != n:
        raise DataError(f"{url}: connection closed after {n} of {expected} bytes")
    return n


def _download_one(fname: str, spec: dict[str, Any], mirrors: list[str], final: Path, log: Log,
                  timeout: float) -> None:
    errors: list[str] = []
    mismatch: DataError | None = None
    for mirror in mirrors:
        url = _url(mirror, fname)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f"{final.name}.", suffix=".part")
        os.close(fd)
        part = Path(tmp)
        try:
            t0 = time.perf_counter()
            log(f"downloading {url}")
            n = _fetch(url, part, timeout)
            try:
                ok, msg = check_file(part, spec)
            except DataError as e:
                ok, msg = False, str(e).replace(str(part), "").lstrip(": ")
            if not ok:
                mismatch = DataError(f"{final}: {msg}; downloaded from {url}, not kept")
                errors.append(f"{url}: {msg}")
                continue
            os.replace(part, final)
            log(f"{final}: {n} bytes in {time.perf_counter() - t0:.1f}s, {msg}")
            return
        except (urllib.error.URLError, OSError, DataError) as e:
            if isinstance(e, urllib.error.HTTPError):
                reason: object = f"HTTP {e.code} {e.reason}"
            else:
                reason = getattr(e, "reason", None) or e
            errors.append(f"{url}: {reason}")
        finally:
            part.unlink(missing_ok=True)
    if mismatch is not None and len(mirrors) == 1:
        raise mismatch
    raise DataError(f"{final}: could not download a verified copy; tried " + "; ".join(errors))


def download(name: str, to: Path, base_url: str | None = None, *, log: Log | None = None,
             timeout: float = 60.0) -> list[Path]:
    """Fetch dataset ``name`` into ``to`` (MNIST-family files into ``to/<folder>/``), verified.

    ``base_url`` replaces the mirrors: each file is fetched from ``base_url/<file name>``. Files
    already present with the right checksum are kept. Returns the files' paths.
    """
    canon, entry = _entry(name)
    log = log or (lambda _msg: None)
    mirrors = [base_url] if base_url else list(entry["mirrors"])
    if not mirrors:
        raise DataError(f"'{canon}' has no public mirror; pass --base-url URL of a server holding "
                        + ", ".join(entry["files"]))
    to = Path(to).expanduser()
    dest = to / entry["folder"] if entry["folder"] else to
    for d in (dest, *dest.parents):  # before any download: mkdir would only say "[Errno 20] ..."
        if d.exists() and not d.is_dir():
            if d == dest != to:
                raise DataError(f"--to {to}: {d} is a file, not a directory, and {canon}'s files go into that "
                                f"folder; move the file away or choose another --to")
            what = "is a file" if d == to else f"cannot be made: {d} is a file"
            raise DataError(f"--to {to} {what}; --to must be a directory (the data folder to download into)")
    created = [p for p in [to, dest] if not p.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    try:
        for fname, spec in entry["files"].items():
            final = dest / fname
            if final.is_file():
                with contextlib.suppress(DataError):
                    ok, msg = check_file(final, spec)
                    if ok:
                        log(f"{final}: already present, {msg}")
                        out.append(final)
                        continue
                log(f"{final}: present but does not verify; downloading again")
            _download_one(fname, spec, mirrors, final, log, timeout)
            out.append(final)
    except BaseException:
        # Leave no empty folders behind that this call made (verified files are kept).
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return out


# ---------------------------------------------------------------------------------------------
# verify


def verify(name: str, data_dir: Path) -> list[tuple[Path, bool, str]]:
    """Check a dataset's files as the loader would find them: (path, ok, message) per file.

    For CIFAR-10 ('cifar10', or 'cifar10-jpeg' for the JPEG copy only) the first entry names the form
    checked (see :func:`fedslim.data.datasets.verify_cifar10`). Raises DataError when the dataset is
    not there at all.
    """
    from fedslim.data import datasets

    canon, entry = _entry(name)
    data_dir = Path(data_dir).expanduser()
    results: list[tuple[Path, bool, str]] = []
    if canon in ("mnist", "fmnist"):
        found = datasets.find_idx_files(canon, data_dir)
        for key, path in found.items():
            spec = entry["files"][datasets.IDX_FILES[key] + ".gz"]
            try:
                ok, msg = check_file(path, spec)
            except DataError as e:
                ok, msg = False, str(e).removeprefix(f"{path}: ")
            if not ok and msg.startswith("checksum mismatch"):
                # MNIST and Fashion-MNIST share file names: say so when it is the other one's file.
                other = "fmnist" if canon == "mnist" else "mnist"
                other_spec = load_checksums()[other]["files"].get(datasets.IDX_FILES[key] + ".gz")
                if other_spec is not None and check_file(path, other_spec)[0]:
                    msg = f"this is the {other} file, not {canon} (its checksum matches {other}'s); {msg}"
            results.append((path, ok, msg))
        return results
    # CIFAR-10: whichever copy the loader reads (pickled or JPEG, folder or archive), in its order.
    return datasets.verify_cifar10(data_dir, "jpeg" if canon == "cifar10-jpeg" else "auto")
