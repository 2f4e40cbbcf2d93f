"""CIFAR-10, python version: checksummed reader and a safe downloader.

The official archive ``cifar-10-python.tar.gz`` unpacks to
``cifar-10-batches-py/`` holding ``data_batch_1`` .. ``data_batch_5``,
``test_batch`` and ``batches.meta``. Each batch is a pickled dict whose
``b"data"`` is a uint8 array ``[n, 3072]`` (per image the R, G and B planes,
1024 bytes each, row-major 32x32) and whose ``b"labels"`` is a list of ints;
``batches.meta`` holds ``b"label_names"``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "CIFAR10_ARCHIVE", "CIFAR10_ARCHIVE_MD5", "CIFAR10_CLASSES", "CIFAR10_DIR", "CIFAR10_MD5", "CIFAR10_URL",
    "DataError", "Dataset", "download_cifar10", "load_cifar10",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
# MD5s published with the dataset and repeated in torchvision's datasets/cifar.py.
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILE = "test_batch"
_META_FILE = "batches.meta"
_ALL_FILES = [*_TRAIN_FILES, _TEST_FILE, _META_FILE]
_CHUNK = 1 << 20


class Dataset(NamedTuple):
    """A whole image-classification data set as CPU tensors."""

    train_images: torch.Tensor  # uint8 [N, 3, 32, 32], NCHW contiguous
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor   # uint8 [M, 3, 32, 32]
    test_labels: torch.Tensor   # int64 [M]
    classes: list[str]
    source: str                 # "cifar10" or "synthetic"


class DataError(RuntimeError):
    """A data file is missing, corrupt or could not be fetched; the message says which and what to do."""


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR files contain (dicts, lists, numpy arrays).

    A pickle can run arbitrary code; refusing every other global keeps a
    tampered file (or one read with checksums disabled) from doing so.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        # The files were written by numpy 1 (numpy.core); numpy 2 writes numpy._core.
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        # Python 3 writes bytes in protocol 2 as _codecs.encode(str, "latin1"): a pure function.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle hook
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        # encoding="bytes": the files come from Python 2, whose str keys become b"data" etc.
        obj = _ArrayUnpickler(f, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ValueError(f"expected a pickled dict, got {type(obj).__name__}")
    # Accept str keys too (a file re-pickled under Python 3).
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _missing_message(root: Path, missing: list[Path]) -> str:
    names = ", ".join(str(p) for p in missing)
    return (
        f"CIFAR-10 file(s) not found: {names}. Pass download=True (or run the example with --download) "
        f"to fetch {CIFAR10_URL} into {root}, or place the official archive {CIFAR10_ARCHIVE} in {root} "
        f"(it is then extracted), or extract it there yourself so that {root / CIFAR10_DIR}/ holds "
        f"{', '.join(_ALL_FILES)}."
    )


def load_cifar10(root: str | os.PathLike, download: bool = False, checksums: dict[str, str] | None = None) -> Dataset:
    """Read CIFAR-10 (python version) from ``root/cifar-10-batches-py`` into uint8 NCHW tensors.

    Every file's MD5 is checked against ``checksums`` (default: the official
    :data:`CIFAR10_MD5`); a file not named in ``checksums`` is not checked, so
    ``checksums={}`` skips verification. If files are missing and
    ``root/cifar-10-python.tar.gz`` exists it is verified and extracted; else
    ``download=True`` fetches it with :func:`download_cifar10`.

    Raises :class:`DataError` naming the file for a missing, mismatched,
    truncated or malformed file.
    """
    root = Path(root).expanduser()
    base = root / CIFAR10_DIR
    checksums = CIFAR10_MD5 if checksums is None else checksums

    missing = [base / name for name in _ALL_FILES if not (base / name).is_file()]
    if missing:
        archive = root / CIFAR10_ARCHIVE
        if archive.is_file():
            # A manually placed archive: no network needed.
            _install_archive(archive, root, CIFAR10_ARCHIVE_MD5, source=str(archive))
        elif download:
            download_cifar10(root)
        else:
            raise DataError(_missing_message(root, missing))
        missing = [base / name for name in _ALL_FILES if not (base / name).is_file()]
        if missing:
            raise DataError(_missing_message(root, missing))

    def read(name: str) -> dict:
        path = base / name
        got = _md5(path)
        expected = checksums.get(name)
        if expected is not None and got != expected.lower():
            raise DataError(
                f"{path}: MD5 mismatch (expected {expected}, got {got}); the file is corrupt or not the "
                f"official CIFAR-10 python version. Delete {base} and load again with download=True."
            )
        try:
            return _unpickle(path)
        except Exception as exc:  # truncated, not a pickle, forbidden content
            raise DataError(
                f"{path} (MD5 {got}) could not be read: {type(exc).__name__}: {exc}. The file is truncated "
                f"or corrupt; delete {base} and load again with download=True."
            ) from exc

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        entry = read(name)
        path = base / name
        try:
            data = np.asarray(entry[b"data"])
            labels = np.asarray(entry[b"labels"], dtype=np.int64)
        except KeyError as exc:
            raise DataError(f"{path} has no {exc.args[0]!r} entry: not a CIFAR-10 batch file") from exc
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: data is {data.dtype} {list(data.shape)}, expected uint8 [n, 3072]")
        if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
            raise DataError(f"{path}: labels must be {data.shape[0]} ints in [0, 9]")
        return data, labels

    meta = read(_META_FILE)
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    except KeyError as exc:
        raise DataError(f"{base / _META_FILE} has no b'label_names' entry") from exc

    train = [batch(name) for name in _TRAIN_FILES]
    test_x, test_y = batch(_TEST_FILE)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])

    def images(rows: np.ndarray) -> torch.Tensor:
        # Each row is R, G, B planes of 32x32 in row-major order: exactly NCHW.
        return torch.from_numpy(np.ascontiguousarray(rows)).reshape(-1, 3, 32, 32)

    return Dataset(
        train_images=images(train_x),
        train_labels=torch.from_numpy(train_y),
        test_images=images(test_x),
        test_labels=torch.from_numpy(test_y),
        classes=classes,
        source="cifar10",
    )


class _Progress:
    """Bytes, percent and MB/s on stderr, at most a few times a second."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.start = self.last = time.monotonic()
        self.tty = enabled and sys.stderr.isatty()

    def update(self, done: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        # On a terminal redraw one line often; in a log write a line every 5 s.
        if not final and now - self.last < (0.25 if self.tty else 5.0):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9) / 1e6
        pct = f" {100.0 * done / self.total:5.1f}%" if self.total else ""
        of = f" / {self.total / 1e6:.1f}" if self.total else ""
        line = f"downloading CIFAR-10: {done / 1e6:.1f}{of} MB{pct} at {rate:.1f} MB/s"
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def _safe_members(tar: tarfile.TarFile, source: str) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        parts = PurePosixPath(m.name).parts
        if m.name.startswith(("/", "\\")) or PurePosixPath(m.name).is_absolute() or ".." in parts:
            raise DataError(f"{source}: refusing to extract unsafe path {m.name!r}")
        if not (m.isfile() or m.isdir()):
            # Links and device files could point outside the target directory.
            raise DataError(f"{source}: refusing to extract {m.name!r} (not a regular file or directory)")
    return members


def _install_archive(archive: Path, root: Path, md5: str | None, source: str) -> Path:
    """Verify ``archive``, extract it to a temp dir in ``root``, move ``cifar-10-batches-py`` into place."""
    if md5 is not None:
        got = _md5(archive)
        if got != md5.lower():
            raise DataError(
                f"{source}: archive MD5 mismatch (expected {md5}, got {got}); the download is corrupt or "
                f"not the official CIFAR-10 python version. Nothing was extracted."
            )
    target = root / CIFAR10_DIR
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-extract-", dir=root))
    old: Path | None = None
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _safe_members(tar, source)
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **kwargs)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{source}: could not extract the archive: {exc}") from exc
        extracted = tmp / CIFAR10_DIR
        if not extracted.is_dir():
            raise DataError(f"{source}: the archive has no {CIFAR10_DIR}/ directory")
        if target.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=".cifar10-old-", dir=root))
            os.replace(target, old / CIFAR10_DIR)
        try:
            os.replace(extracted, target)
        except OSError:
            if old is not None:
                os.replace(old / CIFAR10_DIR, target)
            raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def download_cifar10(
    root: str | os.PathLike,
    url: str = CIFAR10_URL,
    md5: str | None = CIFAR10_ARCHIVE_MD5,
    progress: bool = True,
) -> Path:
    """Download the CIFAR-10 archive, verify its MD5 and install ``root/cifar-10-batches-py``.

    The archive is streamed to a temp file in ``root`` and extracted to a temp
    directory there (absolute paths, ``..`` and links are refused), then moved
    into place with ``os.replace``; temp files are removed on every exit, so a
    failure leaves ``root`` as it was. ``md5=None`` skips the archive check.
    Returns the path of ``cifar-10-batches-py``.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".cifar10-download-", suffix=".tar.gz", dir=root)
    part = Path(name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                length = response.headers.get("Content-Length")
                bar = _Progress(int(length) if length and length.isdigit() else None, progress)
                done = 0
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    done += len(block)
                    bar.update(done)
                bar.update(done, final=True)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DataError(
                f"could not download {url}: {exc}. Check the network, or download {CIFAR10_ARCHIVE} "
                f"elsewhere and place it in {root}."
            ) from exc
        return _install_archive(part, root, md5, source=url)
    finally:
        part.unlink(missing_ok=True)

