"""fastres.data: CIFAR-10 reader and downloader on small files in the official format, the
synthetic set, channel statistics, augmentation and the device-resident loader (CPU)."""

from __future__ import annotations

import ast
import collections
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fastres.data as data
import fastres.data.cifar as cifar
from fastres.data import (
    CIFAR10_CLASSES, CIFAR10_MD5, DataError, Dataset, GPULoader, augment, channel_stats, download_cifar10,
    load_cifar10, synthetic_cifar10,
)

PER_BATCH = 20
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
ALL_FILES = [*TRAIN_FILES, "test_batch", "batches.meta"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, seed: int = 0) -> tuple[dict[str, str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write a small CIFAR-10 in the official python format; return its MD5s and the raw rows and labels."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rows, labels = {}, {}
    for name in [*TRAIN_FILES, "test_batch"]:
        rows[name] = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        labels[name] = [int(v) for v in rng.integers(0, 10, PER_BATCH)]
        entry = {b"batch_label": name.encode(), b"labels": labels[name], b"data": rows[name],
                 b"filenames": [b"x.png"] * PER_BATCH}
        raw = pickle.dumps(entry, protocol=2)
        if name == "data_batch_1":  # as the official files (written by numpy 1) name it
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (base / name).write_bytes(raw)
    meta = {b"num_cases_per_batch": PER_BATCH, b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    (base / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    sums = {name: md5(base / name) for name in ALL_FILES}
    train_rows = np.concatenate([rows[n] for n in TRAIN_FILES])
    train_labels = np.concatenate([labels[n] for n in TRAIN_FILES])
    return sums, train_rows, train_labels, rows["test_batch"], np.array(labels["test_batch"])


def make_archive(tmp_path: Path, members: dict[str, bytes] | None = None) -> tuple[Path, str, dict[str, str]]:
    """A .tar.gz like the official one (cifar-10-batches-py/...) built from write_cifar's files."""
    src = tmp_path / "archive-src"
    sums = write_cifar(src)[0]
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        for name, payload in (members or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive, md5(archive), sums


# ----------------------------------------------------------------------------- reader


def test_reader_layout_labels_classes(tmp_path):
    sums, train_rows, train_labels, test_rows, test_labels = write_cifar(tmp_path)
    ds = load_cifar10(tmp_path, checksums=sums)
    assert isinstance(ds, Dataset) and ds.source == "cifar10" and ds.classes == CIFAR10_CLASSES
    assert ds.train_images.shape == (5 * PER_BATCH, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (PER_BATCH, 3, 32, 32) and ds.train_images.is_contiguous()
    assert ds.train_labels.dtype == torch.int64 and ds.train_labels.tolist() == train_labels.tolist()
    assert ds.test_labels.tolist() == test_labels.tolist()
    # Row layout: R plane, G plane, B plane, each 32x32 row-major -> [c, y, x] = row[c*1024 + y*32 + x].
    rng = np.random.default_rng(1)
    for _ in range(200):
        i, c, y, x = rng.integers(0, 5 * PER_BATCH), rng.integers(0, 3), rng.integers(0, 32), rng.integers(0, 32)
        assert ds.train_images[i, c, y, x].item() == train_rows[i, c * 1024 + y * 32 + x]
    assert ds.test_images[3, 2, 5, 7].item() == test_rows[3, 2 * 1024 + 5 * 32 + 7]


def test_official_checksums_verified_values():
    assert CIFAR10_MD5["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    assert CIFAR10_MD5["test_batch"] == "40351d587109b95175f43aff81a1287e"
    assert CIFAR10_MD5["batches.meta"] == "5ff9c542aee3614f3951f8cda6e48888"
    assert set(CIFAR10_MD5) == set(ALL_FILES)
    assert data.CIFAR10_ARCHIVE_MD5 == "c58f30108f718f92721af3b95e74349a"


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(DataError, match="download=True") as err:
        load_cifar10(tmp_path / "nowhere")
    assert "data_batch_1" in str(err.value) and "--download" in str(err.value)

    sums = write_cifar(tmp_path)[0]
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match=r"not found: \S*/test_batch\. ") as err:  # only the missing one
        load_cifar10(tmp_path, checksums=sums)
    assert "cifar-10-python.tar.gz" in str(err.value)


def test_checksum_mismatch_names_file(tmp_path):
    sums = write_cifar(tmp_path)[0]
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="data_batch_3") as err:
        load_cifar10(tmp_path, checksums=sums)
    assert sums["data_batch_3"] in str(err.value) and md5(path) in str(err.value)
    # The official checksums reject these home-made files too.
    with pytest.raises(DataError, match="MD5 mismatch"):
        load_cifar10(tmp_path)


def test_truncated_and_malformed_files(tmp_path):
    sums = write_cifar(tmp_path)[0]
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="data_batch_2.*MD5 mismatch"):
        load_cifar10(tmp_path, checksums=sums)
    # With the truncated file's own MD5 (or no checks) it still fails cleanly, naming the file.
    with pytest.raises(DataError, match="data_batch_2.*truncated or corrupt"):
        load_cifar10(tmp_path, checksums={**sums, "data_batch_2": md5(path)})
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar10(tmp_path, checksums={})

    # Wrong shape of b"data".
    path.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2.*\[n, 3072\]"):
        load_cifar10(tmp_path, checksums={})


def test_refuses_pickled_code(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    # Any global other than numpy's array reconstruction is refused (a pickle could run code).
    path.write_bytes(pickle.dumps(collections.OrderedDict(data=1), protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle global collections.OrderedDict"):
        load_cifar10(tmp_path, checksums={})


# ----------------------------------------------------------------------------- download


def test_download_from_file_url(tmp_path, capfd):
    archive, archive_md5, sums = make_archive(tmp_path)
    root = tmp_path / "root"
    out = download_cifar10(root, url=archive.as_uri(), md5=archive_md5, progress=True)
    assert out == root / "cifar-10-batches-py"
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no temp files left
    assert {n: md5(out / n) for n in ALL_FILES} == sums
    assert "MB" in capfd.readouterr().err
    ds = load_cifar10(root, checksums=sums)
    assert ds.train_images.shape[0] == 5 * PER_BATCH


def test_download_bad_md5_leaves_nothing(tmp_path):
    archive, _, _ = make_archive(tmp_path)
    root = tmp_path / "root"
    with pytest.raises(DataError, match="MD5 mismatch") as err:
        download_cifar10(root, url=archive.as_uri(), md5="0" * 32, progress=False)
    assert "0" * 32 in str(err.value)
    assert list(root.iterdir()) == []


def test_download_unreachable_leaves_nothing(tmp_path):
    root = tmp_path / "root"
    with pytest.raises(DataError, match="could not download"):
        download_cifar10(root, url=(tmp_path / "absent.tar.gz").as_uri(), progress=False)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("evil", ["../evil", "/tmp/fastres-evil", "cifar-10-batches-py/../../evil"])
def test_download_rejects_unsafe_paths(tmp_path, evil):
    archive, archive_md5, _ = make_archive(tmp_path, {evil: b"boom"})
    root = tmp_path / "root"
    with pytest.raises(DataError, match="unsafe path"):
        download_cifar10(root, url=archive.as_uri(), md5=archive_md5, progress=False)
    assert list(root.iterdir()) == [] and not (tmp_path / "evil").exists()


def test_download_rejects_links(tmp_path):
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    root = tmp_path / "root"
    with pytest.raises(DataError, match="not a regular file"):
        download_cifar10(root, url=archive.as_uri(), md5=None, progress=False)
    assert list(root.iterdir()) == []


def test_load_with_download_replaces_partial_dir(tmp_path, monkeypatch):
    archive, archive_md5, sums = make_archive(tmp_path)
    root = tmp_path / "root"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"junk")
    calls = []

    def fake_download(r, **kw):
        calls.append(r)
        return download_cifar10(r, url=archive.as_uri(), md5=archive_md5, progress=False)

    monkeypatch.setattr(cifar, "download_cifar10", fake_download)
    ds = load_cifar10(root, download=True, checksums=sums)
    assert calls == [root] and ds.train_images.shape[0] == 5 * PER_BATCH
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]
    load_cifar10(root, download=True, checksums=sums)  # complete now: no second download
    assert len(calls) == 1


def test_load_extracts_placed_archive(tmp_path, monkeypatch):
    archive, archive_md5, sums = make_archive(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes())
    monkeypatch.setattr(cifar, "CIFAR10_ARCHIVE_MD5", archive_md5)
    ds = load_cifar10(root, checksums=sums)  # no download flag needed, no network
    assert ds.test_images.shape[0] == PER_BATCH
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_balanced():
    a = synthetic_cifar10(200, 100, seed=1)
    b = synthetic_cifar10(200, 100, seed=1)
    c = synthetic_cifar10(300, 100, seed=2)
    assert a.source == "synthetic" and a.classes == CIFAR10_CLASSES
    assert a.train_images.shape == (200, 3, 32, 32) and a.train_images.dtype == torch.uint8
    assert a.test_images.shape == (100, 3, 32, 32) and a.train_labels.dtype == torch.int64
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    assert not torch.equal(a.test_images, c.test_images)
    assert torch.equal(a.train_labels.bincount(minlength=10), torch.full((10,), 20))
    assert torch.equal(a.test_labels.bincount(minlength=10), torch.full((10,), 10))
    # The test set does not depend on num_train.
    assert torch.equal(synthetic_cifar10(300, 100, seed=1).test_images, a.test_images)
    assert synthetic_cifar10(10, 10, image_size=16).train_images.shape == (10, 3, 16, 16)


def test_synthetic_learnable_not_trivial():
    ds = synthetic_cifar10(2000, 1000)
    x = ds.train_images.float().flatten(1)
    centroids = torch.stack([x[ds.train_labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(ds.test_images.float().flatten(1), centroids).argmin(1)
    acc = (pred == ds.test_labels).float().mean().item()
    # Even a nearest-centroid classifier is far above chance (0.1); it is not separable by it.
    assert 0.35 < acc < 0.95
    assert ds.train_images.float().std() > 30  # real contrast, not a flat image


# ----------------------------------------------------------------------------- stats and augmentation


def test_channel_stats_matches_direct():
    images = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(images, chunk=8)
    x = images.double() / 255
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)
    cl_mean, cl_std = channel_stats(images.contiguous(memory_format=torch.channels_last))
    assert cl_mean == pytest.approx(mean) and cl_std == pytest.approx(std)


def crops_of(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Every crop of the zero-padded images, unflipped and flipped: [B, 2, 2p+1, 2p+1, C, H, W]."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    views = padded.unfold(2, h, 1).unfold(3, w, 1).permute(0, 2, 3, 1, 4, 5)  # [B, oy, ox, C, H, W]
    return torch.stack([views, views.flip(-1)], dim=1)


def match(images: torch.Tensor, out: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each output, whether it is a (maybe flipped) crop of its padded input, and whether flipped."""
    eq = (crops_of(images, padding) == out[:, None, None, None]).flatten(-3).all(-1)  # [B, 2, oy, ox]
    return eq.flatten(1).any(1), eq[:, 1].flatten(1).any(1) & ~eq[:, 0].flatten(1).any(1)


def test_augment_is_shifted_flipped_copy():
    gen = torch.Generator().manual_seed(0)
    # Values 1..255 so padding zeros are distinguishable, random so every crop is unique.
    images = torch.randint(1, 256, (4000, 3, 8, 8), dtype=torch.uint8, generator=gen)
    out = augment(images, torch.Generator().manual_seed(1), padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.is_contiguous()
    ok, flipped = match(images, out, 4)
    assert ok.all()
    assert abs(flipped.float().mean().item() - 0.5) < 0.05
    # Offsets are independent per image: many distinct crops, and zeros (padding) do appear.
    assert (out == 0).any() and not torch.equal(out[0], out[1])
    # Same generator state -> same result; float input -> the same crop in float.
    again = augment(images, torch.Generator().manual_seed(1), padding=4)
    assert torch.equal(out, again)
    small = augment(images[:64], torch.Generator().manual_seed(2), padding=4)
    as_float = augment(images[:64].float(), torch.Generator().manual_seed(2), padding=4)
    assert as_float.dtype == torch.float32 and torch.equal(as_float, small.float())


def test_augment_offsets_cover_range():
    images = torch.arange(1, 1 + 16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16).repeat(2000, 1, 1, 1)
    out = augment(images, torch.Generator().manual_seed(3), padding=2)
    eq = (crops_of(images, 2) == out[:, None, None, None]).flatten(-3).all(-1)  # [B, 2, oy, ox]
    idx = eq.flatten(1).float().argmax(1)
    oy, ox = (idx % 25) // 5, idx % 5
    assert eq.flatten(1).sum(1).eq(1).all()  # exactly one (offset, flip) explains each output
    assert set(oy.tolist()) == set(range(5)) and set(ox.tolist()) == set(range(5))


# ----------------------------------------------------------------------------- loader


def id_set(n: int = 103, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with labels = sample index, so a batch's labels tell which samples it holds."""
    images = torch.randint(1, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return images, torch.arange(n)


def labels_of(loader) -> list[int]:
    return [v for _, y in loader for v in y.tolist()]


def test_loader_train_covers_epoch_and_is_reproducible():
    images, labels = id_set()
    loader = GPULoader(images, labels, 10, train=True, device="cpu", drop_last=False, seed=5)
    assert len(loader) == 11 and loader.num_samples == 103
    loader.set_epoch(3)
    first = list(loader)
    assert sorted(v for _, y in first for v in y.tolist()) == list(range(103))
    assert [x.shape[0] for x, _ in first] == [10] * 10 + [3]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in first)
    loader.set_epoch(3)
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    order3 = [v for _, y in again for v in y.tolist()]
    # set_epoch(3) was consumed: the next pass is epoch 4, a different shuffle; a fresh loader reproduces it.
    order4 = labels_of(loader)
    assert order4 != order3
    fresh = GPULoader(images, labels, 10, train=True, device="cpu", drop_last=False, seed=5)
    fresh.set_epoch(4)
    assert labels_of(fresh) == order4
    other_seed = GPULoader(images, labels, 10, train=True, device="cpu", drop_last=False, seed=6)
    other_seed.set_epoch(3)
    assert labels_of(other_seed) != order3


def test_loader_drop_last_default_and_len():
    images, labels = id_set()
    train = GPULoader(images, labels, 10, train=True, device="cpu")
    assert train.drop_last and len(train) == 10 and train.num_samples == 100
    seen = labels_of(train)
    assert len(seen) == 100 and len(set(seen)) == 100
    test = GPULoader(images, labels, 10, train=False, device="cpu")
    assert not test.drop_last and len(test) == 11 and labels_of(test) == list(range(103))


def test_loader_train_batches_are_augmented_crops():
    images, labels = id_set()
    loader = GPULoader(images, labels, 16, train=True, device="cpu", drop_last=False, seed=1)
    mean = torch.tensor(loader.mean).view(1, 3, 1, 1)
    std = torch.tensor(loader.std).view(1, 3, 1, 1)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    raw = ((x * std + mean) * 255).round().to(torch.uint8)  # undo the normalisation
    ok, flipped = match(images[y], raw, 4)
    assert ok.all() and 0 < flipped.sum() < len(y)


@pytest.mark.parametrize("drop_last", [True, False])
def test_loader_shards_disjoint_and_covering(drop_last):
    images, labels = id_set()
    world = 4
    shards = []
    for rank in range(world):
        loader = GPULoader(images, labels, 5, train=True, device="cpu", seed=2, drop_last=drop_last,
                           rank=rank, world_size=world)
        loader.set_epoch(7)
        shards.append(labels_of(loader))
        assert len(shards[-1]) == loader.num_samples
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1  # every rank has the same number of samples (and batches)
    flat = [v for s in shards for v in s]
    if drop_last:
        assert lengths == {25} and len(set(flat)) == len(flat) == 100  # disjoint
    else:
        assert lengths == {26} and set(flat) == set(range(103)) and len(flat) == 104  # one wrap-around pad
    # Eval mode, two ranks: fixed order, interleaved like DistributedSampler.
    even = GPULoader(images[:10], labels[:10], 3, train=False, device="cpu", rank=0, world_size=2)
    odd = GPULoader(images[:10], labels[:10], 3, train=False, device="cpu", rank=1, world_size=2)
    assert labels_of(even) == [0, 2, 4, 6, 8] and labels_of(odd) == [1, 3, 5, 7, 9] and len(even) == len(odd) == 2


def test_loader_eval_normalisation_and_layout():
    images, labels = id_set(50)
    loader = GPULoader(images, labels, 20, train=False, device="cpu")
    mean, std = channel_stats(images)
    assert loader.mean == pytest.approx(mean) and loader.std == pytest.approx(std)
    x = torch.cat([b for b, _ in loader])
    direct = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, direct, rtol=1e-5, atol=1e-5)

    given = GPULoader(images, labels, 20, train=False, device="cpu", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                      channels_last=True, dtype=torch.bfloat16)
    batches = list(given)
    assert all(b.is_contiguous(memory_format=torch.channels_last) and b.dtype == torch.bfloat16 for b, _ in batches)
    direct = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(torch.cat([b for b, _ in batches]).float(), direct, rtol=1e-2, atol=1e-2)
    plain = next(iter(GPULoader(images, labels, 20, train=False, device="cpu")))[0]
    assert plain.is_contiguous() and not plain.is_contiguous(memory_format=torch.channels_last)


def test_loader_argument_errors():
    images, labels = id_set(10)
    with pytest.raises(ValueError, match="labels"):
        GPULoader(images, labels[:5], 2, train=True, device="cpu")
    with pytest.raises(ValueError, match="rank"):
        GPULoader(images, labels, 2, train=True, device="cpu", rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        GPULoader(images, labels, 0, train=True, device="cpu")


def test_no_torchvision_import():
    for path in Path(data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n and n.split(".")[0] == "torchvision" for n in names), path
