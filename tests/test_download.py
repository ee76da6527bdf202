"""Downloads against a local HTTP server, checksum verification, and the ``data`` CLI commands."""

from __future__ import annotations

import argparse
import gzip
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from fedslim.data import DataError, load_dataset
from fedslim.data import download as dl
from fedslim.data.cli import add_data_commands

SHARED = Path(os.environ.get("FEDSLIM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_shared = pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="shared data folder not present")
LABELS = "train-labels-idx1-ubyte.gz"


class Server:
    """A static file server on 127.0.0.1 (random port) that records the paths it was asked for."""

    def __init__(self, folder: Path):
        requests: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.requests = requests
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    folder = tmp_path / "served"
    folder.mkdir()
    srv = Server(folder)
    yield srv, folder
    srv.close()


def files_under(p: Path) -> list[Path]:
    return sorted(f for f in p.rglob("*") if f.is_file()) if p.exists() else []


def copy_mnist(folder: Path) -> None:
    for f in (SHARED / "mnist").iterdir():
        shutil.copyfile(f, folder / f.name)


# ---------------------------------------------------------------------------------------------


@needs_shared
def test_download_mnist_from_local_server_verifies_and_loads(served: tuple[Server, Path], tmp_path: Path) -> None:
    srv, folder = served
    copy_mnist(folder)
    to = tmp_path / "data"
    got = dl.download("mnist", to, base_url=srv.url)
    assert sorted(p.name for p in got) == sorted(f.name for f in (SHARED / "mnist").iterdir())
    assert all(p.parent == to / "mnist" for p in got)
    assert not [f for f in files_under(to) if f.name.endswith(".part")]
    assert len(load_dataset("mnist", to, test_subset=5).train) == 60000

    n = len(srv.requests)
    dl.download("mnist", to, base_url=srv.url)  # already present and verified: nothing fetched
    assert len(srv.requests) == n == 4


@needs_shared
def test_regzipped_files_still_verify_by_content(served: tuple[Server, Path], tmp_path: Path) -> None:
    srv, folder = served
    copy_mnist(folder)
    content = gzip.decompress((folder / LABELS).read_bytes())
    (folder / LABELS).write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))
    assert (folder / LABELS).read_bytes() != (SHARED / "mnist" / LABELS).read_bytes()
    dl.download("mnist", tmp_path / "data", base_url=srv.url)
    assert (tmp_path / "data" / "mnist" / LABELS).is_file()


@needs_shared
def test_corrupted_served_file_fails_checksum_and_is_not_kept(served: tuple[Server, Path], tmp_path: Path) -> None:
    srv, folder = served
    copy_mnist(folder)
    content = bytearray(gzip.decompress((folder / LABELS).read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed, still a valid gzip IDX file
    (folder / LABELS).write_bytes(gzip.compress(bytes(content)))
    to = tmp_path / "data"
    with pytest.raises(DataError) as e:
        dl.download("mnist", to, base_url=srv.url)
    msg = str(e.value)
    spec = dl.load_checksums()["mnist"]["files"][LABELS]
    assert str(to / "mnist" / LABELS) in msg and spec["sha256"] in msg and "got " in msg
    assert not (to / "mnist" / LABELS).exists()
    left = files_under(to)
    assert not [f for f in left if f.name.endswith(".part")]
    # Only files that verified may remain.
    for f in left:
        assert dl.check_file(f, dl.load_checksums()["mnist"]["files"][f.name])[0]


def test_corrupt_first_file_leaves_nothing_behind(served: tuple[Server, Path], tmp_path: Path) -> None:
    srv, folder = served
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate")
    to = tmp_path / "fresh"
    with pytest.raises(DataError, match="corrupt gzip"):
        dl.download("mnist", to, base_url=srv.url)
    assert not to.exists()  # not even the folders it made


def test_missing_file_on_server_names_the_url(served: tuple[Server, Path], tmp_path: Path) -> None:
    srv, _ = served
    url = r"http://127\.0\.0\.1:\d+/train-images-idx3-ubyte\.gz"
    with pytest.raises(DataError, match=rf"could not download.*tried {url}: HTTP 404"):
        dl.download("fmnist", tmp_path / "d", base_url=srv.url)
    assert not (tmp_path / "d").exists()


def test_cifar10_archive_is_verified_as_a_file(served: tuple[Server, Path], tmp_path: Path) -> None:
    srv, folder = served
    (folder / "cifar-10-python.tar.gz").write_bytes(b"definitely not the real archive")
    to = tmp_path / "d"
    to.mkdir()
    with pytest.raises(DataError) as e:
        dl.download("cifar10", to, base_url=srv.url)
    assert "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce" in str(e.value)
    assert files_under(to) == []


@needs_shared
def test_cifar10_jpeg_archive_downloads_and_verifies(served: tuple[Server, Path], tmp_path: Path) -> None:
    srv, folder = served
    (folder / "cifar10-jpeg.tar.gz").symlink_to(SHARED / "cifar10-jpeg.tar.gz")
    [path] = dl.download("cifar10-jpeg", tmp_path / "d", base_url=srv.url)
    assert path == tmp_path / "d" / "cifar10-jpeg.tar.gz"
    assert path.stat().st_size == (SHARED / "cifar10-jpeg.tar.gz").stat().st_size
    with pytest.raises(DataError, match="no public mirror"):
        dl.download("cifar10-jpeg", tmp_path / "e")


@needs_shared
def test_verify_accepts_good_and_flags_tampered_files(tmp_path: Path) -> None:
    assert all(ok for _, ok, _ in dl.verify("mnist", SHARED))
    assert all(ok for _, ok, _ in dl.verify("fashion-mnist", SHARED))
    d = tmp_path / "mnist"
    d.mkdir()
    copy_mnist(d)
    # An uncompressed copy verifies too: the hash is of the content.
    raw = gzip.decompress((d / LABELS).read_bytes())
    (d / LABELS).unlink()
    (d / LABELS.removesuffix(".gz")).write_bytes(raw)
    assert all(ok for _, ok, _ in dl.verify("mnist", tmp_path))
    (d / LABELS.removesuffix(".gz")).write_bytes(raw[:-1] + b"\x07")
    bad = [(p.name, msg) for p, ok, msg in dl.verify("mnist", tmp_path) if not ok]
    assert [n for n, _ in bad] == ["train-labels-idx1-ubyte"] and "checksum mismatch" in bad[0][1]


# ---------------------------------------------------------------------------------------------
# CLI


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedslim")
    sub = parser.add_subparsers(dest="command")
    add_data_commands(sub)
    args = parser.parse_args(list(argv))
    return int(args.func(args))


@needs_shared
def test_cli_download_info_verify(served: tuple[Server, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    srv, folder = served
    copy_mnist(folder)
    to = tmp_path / "data"
    assert run_cli("data", "download", "mnist", "--to", str(to), "--base-url", srv.url) == 0
    assert str(to / "mnist" / LABELS) in capsys.readouterr().out
    assert run_cli("data", "info", "mnist", "--data-dir", str(to)) == 0
    out = capsys.readouterr().out
    assert "60000 samples" in out and "10000 samples" in out and "(1, 28, 28)" in out
    assert run_cli("data", "verify", "mnist", "--data-dir", str(to)) == 0
    (to / "mnist" / LABELS).write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\0"))
    assert run_cli("data", "verify", "mnist", "--data-dir", str(to)) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "1 of 4 files failed" in captured.err


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("data", "info", "mnist", "--data-dir", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedslim: ") and "Traceback" not in err
    assert "fedslim data download mnist --to DIR" in err
    assert run_cli("data", "download", "imagenet", "--to", str(tmp_path)) == 1
    assert "downloadable: cifar10, cifar10-jpeg, fmnist, mnist" in capsys.readouterr().err
    assert run_cli("data", "info", "synthetic", "--option", "bogus=1") == 1
    assert "data.options.bogus" in capsys.readouterr().err


def test_cli_list_and_info_of_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("data", "list") == 0
    out = capsys.readouterr().out
    for name in ("digits", "mnist", "fmnist", "cifar10", "imagefolder", "synthetic"):
        assert f"\n{name} " in "\n" + out
    assert run_cli("data", "info", "synthetic", "--option", "num_classes=3", "--option", "shape=[2, 3, 3]") == 0
    out = capsys.readouterr().out
    assert "classes   3" in out and "(2, 3, 3)" in out
    assert run_cli("data", "verify", "digits", "--data-dir", ".") == 0


@needs_shared
def test_cli_verify_cifar10_checks_the_copy_the_loader_reads(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("data", "verify", "cifar10", "--data-dir", str(SHARED)) == 0
    assert f"ok    {SHARED / 'cifar10-jpeg.tar.gz'}: JPEG image-folder archive" in capsys.readouterr().out
    (tmp_path / "cifar10-jpeg.tar.gz").write_bytes(b"not the archive")
    assert run_cli("data", "verify", "cifar10", "--data-dir", str(tmp_path)) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "checksum mismatch" in captured.out and "1 of 1 files failed" in captured.err
    # An unpacked tree wins over the archive beside it, as in the loader; a missing class is named.
    tree = tmp_path / "cifar10-jpeg"
    for split in ("train", "test"):
        (tree / split / "cat").mkdir(parents=True)
    assert run_cli("data", "verify", "cifar10", "--data-dir", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert f"ok    {tree}: JPEG image-folder tree" in out
    assert f"FAIL  {tree / 'train' / 'airplane'}: class folder not found (expected 5000 images in it)" in out
    assert f"FAIL  {tree / 'test' / 'cat'}: 0 images, expected 1000" in out


def test_cli_output_cut_short_by_the_reader_is_not_an_error_message() -> None:
    # `fedslim data info ... | head -1`: before, "fedslim: [Errno 32] Broken pipe" on stderr and exit 1.
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "fedslim", "data", "info", "synthetic", "--option",
                             "num_classes=5000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away while ~250 KB of class lines are still to come
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert first.startswith(b"dataset   synthetic")
    assert err == ""


@needs_shared
def test_verify_says_when_a_file_is_the_other_datasets(tmp_path: Path) -> None:
    # MNIST and Fashion-MNIST files have the same names. Before: only "checksum mismatch ...".
    d = tmp_path / "mnist"
    shutil.copytree(SHARED / "mnist", d)
    shutil.copy(SHARED / "fashion-mnist" / LABELS, d / LABELS)
    results = {p.name: (ok, msg) for p, ok, msg in dl.verify("mnist", tmp_path)}
    ok, msg = results[LABELS]
    assert not ok and msg.startswith("this is the fmnist file, not mnist (its checksum matches fmnist's); "
                                     "checksum mismatch")
    assert all(ok for name, (ok, _) in results.items() if name != LABELS)


@needs_shared
def test_cli_verify_finds_the_data_folder_as_the_loader_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # It required --data-dir while `data info` and runs fall back to $FEDSLIM_DATA, then ./data.
    monkeypatch.setenv("FEDSLIM_DATA", str(SHARED))
    assert run_cli("data", "verify", "mnist") == 0
    assert f"ok    {SHARED / 'mnist'}" in capsys.readouterr().out
    monkeypatch.delenv("FEDSLIM_DATA")
    monkeypatch.chdir(tmp_path)
    assert run_cli("data", "verify", "mnist") == 1  # ./data, which holds no MNIST
    assert "not found: looked for train-images-idx3-ubyte[.gz] etc. in data/mnist" in capsys.readouterr().err
