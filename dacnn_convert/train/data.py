"""Datasets as in-memory uint8 tensors with batch-level augmentation.

Small vision datasets fit in memory; transforming whole batches of tensors (resize,
grayscale -> 3 channels, random flip, normalisation) is much faster on a 2-core CPU
than per-image PIL transforms in worker processes.

``fashion-mnist`` is read from Debian's ``dataset-fashion-mnist`` package when it is
installed (its .gz files differ from torchvision's checksums, so we unpack them
ourselves into the cache), else from torchvision with ``download=True``.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write
from ..errors import DatasetError, choose, first_line
from ..names import AUGMENTS
from ..registry import Registry

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASETS: Registry[Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = Registry("dataset")
# decorator: a loader returning (train_x, train_y, val_x, val_y), uint8 NCHW / int64
register_dataset = DATASETS.register


def cache_dir() -> Path:
    """Where datasets are unpacked or downloaded: $DACNN_DATA, else ~/.cache/dacnn.

    Raises:
        DatasetError: $DACNN_DATA names something that is not a folder (e.g. a file).
    """
    root = Path(os.environ.get("DACNN_DATA", Path.home() / ".cache" / "dacnn"))
    if root.exists() and not root.is_dir():
        raise DatasetError(f"DACNN_DATA={str(root)!r} is not a folder: point it at a folder for the datasets")
    return root


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    _, _, dtype_code, ndim = struct.unpack(">BBBB", raw[:4])
    if dtype_code != 0x08:
        raise DatasetError(f"{path} is not a uint8 idx file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _unpack_debian_fashion_mnist(target: Path) -> bool:
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if not all((DEBIAN_FASHION_MNIST / f"{n}.gz").is_file() for n in names):
        return False
    target.mkdir(parents=True, exist_ok=True)
    for n in names:
        out = target / n
        if not out.is_file():
            raw = gzip.decompress((DEBIAN_FASHION_MNIST / f"{n}.gz").read_bytes())
            atomic_write(out, functools.partial(Path.write_bytes, data=raw))
    return True


@register_dataset("fashion-mnist")
def _fashion_mnist(download: bool = False):
    root = cache_dir() / "fashion-mnist"
    if _unpack_debian_fashion_mnist(root):
        xs = [_read_idx(root / f"{s}-images-idx3-ubyte") for s in ("train", "t10k")]
        ys = [_read_idx(root / f"{s}-labels-idx1-ubyte") for s in ("train", "t10k")]
        return (
            torch.from_numpy(xs[0].copy()).unsqueeze(1),
            torch.from_numpy(ys[0].astype(np.int64)),
            torch.from_numpy(xs[1].copy()).unsqueeze(1),
            torch.from_numpy(ys[1].astype(np.int64)),
        )
    from torchvision.datasets import FashionMNIST

    sets = [_torchvision(FashionMNIST, root, train=t, download=download) for t in (True, False)]
    return sets[0].data.unsqueeze(1), sets[0].targets, sets[1].data.unsqueeze(1), sets[1].targets


def _torchvision(cls, root: Path, download: bool, **kwargs):
    try:
        return cls(str(root), download=download, **kwargs)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DatasetError(
            f"{cls.__name__} is not in {root} ({first_line(exc)}); pass «download» to fetch it "
            f"(needs internet), or put the files there yourself (set DACNN_DATA to use another folder)"
        ) from exc
    except OSError as exc:
        raise DatasetError(f"cannot download {cls.__name__} (offline?): {exc}") from exc


def _cifar(cls_name: str, download: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    root = cache_dir() / cls_name.lower()
    sets = [_torchvision(cls, root, download=download, train=t) for t in (True, False)]
    out = []
    for s in sets:
        out += [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets, dtype=torch.int64)]
    return tuple(out)


@register_dataset("cifar10")
def _cifar10(download: bool = False):
    return _cifar("CIFAR10", download)


@register_dataset("cifar100")
def _cifar100(download: bool = False):
    return _cifar("CIFAR100", download)


@register_dataset("svhn")
def _svhn(download: bool = False):
    from torchvision.datasets import SVHN

    root = cache_dir() / "svhn"
    sets = [_torchvision(SVHN, root, download=download, split=s) for s in ("train", "test")]
    return (
        torch.from_numpy(sets[0].data),
        torch.from_numpy(sets[0].labels.astype(np.int64)),
        torch.from_numpy(sets[1].data),
        torch.from_numpy(sets[1].labels.astype(np.int64)),
    )


@register_dataset("synthetic")
def _synthetic(download: bool = False, n_train: int = 512, n_val: int = 256, classes: int = 10, size: int = 16):
    """Deterministic, learnable images: one random prototype per class plus noise."""
    g = torch.Generator().manual_seed(1234)
    protos = torch.rand(classes, 3, size, size, generator=g) * 255

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % classes
        x = 0.75 * protos[y] + 0.25 * torch.rand(n, 3, size, size, generator=g) * 255
        return x.to(torch.uint8), y

    return (*make(n_train), *make(n_val))


class TensorLoader:
    """Batches of (images, labels) from uint8 tensors, transformed on the fly, batch at a time.

    Shards by ``rank``/``world_size`` like DistributedSampler, so each process of a
    ``torchrun`` job sees its own slice of every epoch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        size: int,
        channels: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        train: bool,
        flip: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size, self.size, self.channels = batch_size, size, channels
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.train, self.flip = train, flip
        self.seed, self.epoch = seed, 0
        self.rank, self.world_size = rank, world_size
        self.pin_memory = False  # page-locked batches: asynchronous copies to a GPU
        self.name: str | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically per epoch (as DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        per_rank = len(self.x) // self.world_size
        return (per_rank + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.x), generator=g) if self.train else torch.arange(len(self.x))
        per_rank = len(self.x) // self.world_size
        order = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            x, y = self.transform(self.x[idx], g), self.y[idx]
            yield (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def transform(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        """uint8 NCHW -> normalised float at the model's size and channel count."""
        x = x.float().div_(255)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        if self.train and self.flip:
            mask = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
        return x.contiguous()


@dataclass
class Loaders:
    """Train and validation loaders plus what a model needs to know about the data."""

    train: TensorLoader
    val: TensorLoader
    num_classes: int
    name: str


class _EpochLoader:
    """A DataLoader whose distributed sampler follows ``set_epoch``, like :class:`TensorLoader`."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        return iter(self.loader)


class ImagePreprocess(Protocol):
    """How images are prepared for a pretrained model (``dacnn_convert.io.sources.InputConfig``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str


def _imagefolder(
    root: Path,
    batch_size: int,
    size: int,
    flip: bool,
    seed: int,
    rank: int,
    world_size: int,
    pin_memory: bool = False,
    image: ImagePreprocess | None = None,
) -> Loaders:
    """ImageNet-style ``root/train/CLASS/*.jpg`` and ``root/val/CLASS/*.jpg``, streamed from disk.

    Images are prepared as the model's pretrained weights expect (``image``: mean, std, centre
    crop, resampling), the ImageNet convention without one.
    """
    from torchvision import datasets, transforms

    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(f"imagefolder:{root} needs {root / split}/ with one sub-folder per class")
    mean, std = (image.mean, image.std) if image is not None else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    crop_pct = image.crop_pct if image is not None else 0.875
    mode = transforms.InterpolationMode(image.interpolation if image is not None else "bilinear")
    norm = transforms.Normalize(list(mean), list(std))
    resize = [transforms.Resize(int(round(size / crop_pct)), interpolation=mode), transforms.CenterCrop(size)]
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(size, interpolation=mode)]
        + ([transforms.RandomHorizontalFlip()] if flip else [])
        + [transforms.ToTensor(), norm]
    )
    val_tf = transforms.Compose([*resize, transforms.ToTensor(), norm])
    try:
        train_set = datasets.ImageFolder(str(root / "train"), train_tf)
        val_set = datasets.ImageFolder(str(root / "val"), val_tf)
    except (FileNotFoundError, OSError) as exc:  # no class folder, or a class folder without images
        raise DatasetError(
            f"imagefolder:{root}: {first_line(exc)}; each of train/ and val/ needs one sub-folder of images per class"
        ) from None
    if train_set.classes != val_set.classes:  # the label of a class is its index in the sorted folder names
        only = sorted(set(train_set.classes) ^ set(val_set.classes))
        raise DatasetError(
            f"imagefolder:{root}: train/ and val/ have different classes ({', '.join(only[:5])} in only one), so "
            "their labels would not match; give both the same class folders"
        )
    sampler: torch.utils.data.Sampler[int] | None = (
        torch.utils.data.DistributedSampler(train_set, world_size, rank, seed=seed) if world_size > 1 else None
    )
    workers = min(8, os.cpu_count() or 1)
    loader = functools.partial(
        torch.utils.data.DataLoader, num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0
    )
    train = loader(train_set, batch_size, shuffle=sampler is None, sampler=sampler)
    val = loader(val_set, max(batch_size, 256))
    return Loaders(_EpochLoader(train), _EpochLoader(val), len(train_set.classes), f"imagefolder:{root}")  # type: ignore[arg-type]


NATIVE_SIZE = 32  # every registered dataset is trained at 32x32 (Fashion-MNIST's 28 px are resized)


def native_size(name: str) -> int | None:
    """The side a registered dataset is used at (32), None for ``imagefolder:`` (the model decides)."""
    return None if name.startswith("imagefolder:") else NATIVE_SIZE


def make_loaders(
    name: str,
    batch_size: int = 128,
    input_size: int = 32,
    channels: int = 3,
    augment: str = "auto",
    download: bool = False,
    train_limit: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    image: ImagePreprocess | None = None,
) -> Loaders:
    """Load dataset ``name`` and wrap it in train/val loaders.

    Args:
        name: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``svhn``, ``synthetic`` or
            ``imagefolder:PATH`` (``PATH/train`` and ``PATH/val``, one sub-folder per class).
        batch_size: images per batch (per process).
        input_size: side of the square images the model sees (resized if needed).
        channels: channels of the model's stem; grayscale data is repeated to 3.
        augment: ``auto`` (random horizontal flip as in the paper, none for SVHN), ``flip`` or ``none``.
        download: let torchvision fetch a missing dataset.
        train_limit: keep a fixed random subset of N training images (drawn with ``seed``).
        seed: shuffling seed.
        rank, world_size: this process's shard of the training set (torchrun).
        pin_memory: yield page-locked batches, for asynchronous copies to a GPU.
        image: for ``imagefolder:`` data, the model's own preprocessing (mean, std, crop,
            resampling; :func:`dacnn_convert.io.sources.input_config`); the registered 32 px
            datasets are normalised by their own statistics.

    Raises:
        DatasetError: the data is missing (with where it must be and how to get it).
        UsageError: unknown dataset or augmentation.
    """
    choose("augment", augment, AUGMENTS)
    if name.startswith("imagefolder:"):
        root = Path(name.split(":", 1)[1])
        return _imagefolder(root, batch_size, input_size, augment != "none", seed, rank, world_size, pin_memory, image)
    tx, ty, vx, vy = DATASETS.get_or_raise(name, extra=("imagefolder:PATH",))(download=download)
    if train_limit is not None:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(tx), generator=g)[:train_limit]
        tx, ty = tx[keep], ty[keep]
    stats = tx[: min(len(tx), 10000)].float().div(255)
    mean = stats.mean(dim=(0, 2, 3))
    std = stats.std(dim=(0, 2, 3)).clamp_min(1e-3)
    if tx.shape[1] == 1 and channels == 3:
        mean, std = mean.expand(3), std.expand(3)
    flip = augment == "flip" or (augment == "auto" and name != "svhn")
    loader = functools.partial(TensorLoader, size=input_size, channels=channels, mean=mean, std=std, seed=seed)
    train = loader(tx, ty, batch_size, train=True, flip=flip, rank=rank, world_size=world_size)
    val = loader(vx, vy, max(batch_size, 256), train=False, flip=False)
    train.pin_memory = val.pin_memory = pin_memory
    train.name = val.name = name  # what the data is called, for reports and model cards
    return Loaders(train, val, int(max(ty.max().item(), vy.max().item())) + 1, name)
