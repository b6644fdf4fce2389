"""Training/validation dataset of images with YOLO-format labels, and the DataLoader around it.

Layout: for ``.../images/x.jpg`` the label is ``.../labels/x.txt`` (rows ``class xc yc w h``,
normalised). Images come from a folder (searched recursively), a ``.txt`` list of paths (relative
lines resolve against the list's folder), a glob, or a list of these.

Batches are ``(imgs uint8 (B, 3, H, W) RGB, targets float (n, 6) [image_index, class, xc, yc, w, h],
paths tuple[str], shapes tuple)`` with ``shapes[i] = ((h0, w0), ((gain_h, gain_w), (padw, padh)))``
for letterboxed images (what ``scale_boxes`` takes as ``ratio_pad``) and None for mosaics.
"""

from __future__ import annotations

import glob
import os
import signal
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from utils.augmentations import (
    augment_hsv,
    flip_lr,
    flip_ud,
    letterbox,
    mixup,
    mosaic4,
    random_perspective,
    resize_long_side,
)
from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.general import IMG_FORMATS, LOGGER
from utils.label_checks import (
    check_class_ids,
    files_hash,
    imread,
    load_cache,
    save_cache,
    scan_pairs,
    summarize,
)

AUGMENT_HYP_KEYS = (
    "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
    "flipud", "fliplr", "mosaic", "mixup",
)  # fmt: skip


def _files_from_entry(p: Path) -> list[str]:
    """All files named by one source entry: a folder (recursive), a .txt list, a glob or a file."""
    if p.is_dir():
        return [str(f) for f in p.rglob("*") if f.is_file()]
    if p.is_file() and p.suffix.lower() == ".txt":
        parent = p.parent
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [str(Path(ln) if Path(ln).is_absolute() else (parent / ln).resolve()) for ln in lines]
    if p.is_file():
        return [str(p)]
    if glob.has_magic(str(p)):
        return sorted(glob.glob(str(p), recursive=True))
    raise FileNotFoundError(f"image source does not exist: {p}")


def get_image_files(path: str | Path | Sequence[str | Path]) -> list[str]:
    """Sorted image paths (by extension in IMG_FORMATS) from one source or a list of sources."""
    entries = [path] if isinstance(path, (str, Path)) else list(path)
    files = []
    for entry in entries:
        files += _files_from_entry(Path(entry).expanduser())
    images = sorted({f for f in files if f.rsplit(".", 1)[-1].lower() in IMG_FORMATS})
    if not images:
        raise FileNotFoundError(f"no images found in {path}; supported formats: {', '.join(IMG_FORMATS)}")
    return images


def img2label_paths(im_files: Sequence[str]) -> list[str]:
    """Label path per image: the last ``/images/`` folder becomes ``/labels/``, the suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    out = []
    for f in im_files:
        head, sep, tail = f.rpartition(sa)
        swapped = head + sb + tail if sep else f
        out.append(os.path.splitext(swapped)[0] + ".txt")
    return out


def label_cache_path(path: Any, label_files: Sequence[str]) -> Path:
    """``list.cache`` beside a .txt image list, else ``<labels dir>.cache``."""
    if isinstance(path, (str, Path)) and Path(path).is_file() and Path(path).suffix == ".txt":
        return Path(path).with_suffix(".cache")
    return Path(label_files[0]).parent.with_suffix(".cache")


def rect_batch_shapes(
    shapes_wh: np.ndarray, batch_index: np.ndarray, img_size: int, stride: int, pad: float
) -> np.ndarray:
    """(h, w) input shape per batch for rectangular training/validation.

    Args:
        shapes_wh: (N, 2) image sizes (w, h), already sorted by aspect ratio h/w.
        batch_index: (N,) batch number of each image.

    Returns:
        (nb, 2) int array of (h, w): the batch's widest aspect scaled to ``img_size`` on the long
        side, plus ``pad`` strides, rounded up to multiples of ``stride``.
    """
    aspect = shapes_wh[:, 1] / shapes_wh[:, 0]
    nb = int(batch_index[-1]) + 1
    rel = np.ones((nb, 2))
    for b in range(nb):
        ar = aspect[batch_index == b]
        lo, hi = ar.min(), ar.max()
        if hi < 1:  # all landscape: full width, height of the tallest
            rel[b] = [hi, 1]
        elif lo > 1:  # all portrait: full height, width of the widest
            rel[b] = [1, 1 / lo]
    return (np.ceil(rel * img_size / stride + pad) * stride).astype(int)


class LoadImagesAndLabels(Dataset):
    """YOLO-format dataset with verification, label cache, rect batches, image cache and augmentation.

    Attributes: im_files, label_files, labels (list of float32 (n, 5) ``[class, xc, yc, w, h]``),
    shapes ((N, 2) int (w, h)), n, batch (batch index per image), indices (sampling order the
    trainer may replace for image weights), hyp, augment, mosaic, rect.
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        img_size: int = 640,
        batch_size: int = 16,
        augment: bool = False,
        hyp: dict[str, Any] | None = None,
        rect: bool = False,
        image_weights: bool = False,
        cache_images: bool | str | None = None,
        single_cls: bool = False,
        stride: int = 32,
        pad: float = 0.0,
        prefix: str = "",
        seed: int = 0,
        nc: int | None = None,
    ) -> None:
        if augment:
            if hyp is None:
                raise ValueError("augment=True needs hyp (e.g. data/hyps/hyp.scratch-low.yaml)")
            missing = [k for k in AUGMENT_HYP_KEYS if k not in hyp]
            if missing:
                raise ValueError(f"hyp is missing augmentation keys {missing}")
        self.img_size, self.augment, self.hyp, self.stride = img_size, augment, hyp, stride
        self.image_weights, self.prefix = image_weights, prefix
        self.rect = False if image_weights else rect
        self.mosaic = augment and not self.rect  # mosaic pieces have no single rect shape
        self.mosaic_border = (-img_size // 2, -img_size // 2)
        self.rng = np.random.default_rng(seed)  # replaced per worker by seed_worker

        self._load_labels(path, nc, single_cls)
        self.n = len(self.im_files)
        self.batch = np.arange(self.n) // batch_size
        self.indices: Sequence[int] = np.arange(self.n)
        if self.rect:
            self._sort_for_rect(batch_size, pad)
        self.ims: list[np.ndarray | None] = [None] * self.n
        self.npy_files = [str(Path(f).with_suffix(".npy")) for f in self.im_files]
        if cache_images:
            self._cache_images(cache_images)

    def _load_labels(self, path: Any, nc: int | None, single_cls: bool) -> None:
        """Find images, verify or load cached labels, drop bad pairs, check class ids."""
        im_files = get_image_files(path)
        label_files = img2label_paths(im_files)
        cache_file = label_cache_path(path, label_files)
        key = files_hash(im_files + label_files)
        results = load_cache(cache_file, key)
        if results is None:
            results = scan_pairs(im_files, label_files)
            if save_cache(cache_file, results, key):
                LOGGER.info(f"{self.prefix}label cache saved: {cache_file}")
        else:
            LOGGER.info(f"{self.prefix}label cache loaded: {cache_file}")
        summarize(results, prefix=self.prefix)
        good = [r for r in results if r.ok]
        if not good:
            raise ValueError(f"{self.prefix}no usable images in {path}; see the warnings above for why")
        self.im_files = [r.im_file for r in good]
        self.label_files = [r.label_file for r in good]
        self.labels = [r.labels.copy() for r in good]
        self.shapes = np.array([r.shape for r in good], dtype=np.int64)
        check_class_ids(self.labels, self.label_files, None if single_cls else nc)
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0

    def _sort_for_rect(self, batch_size: int, pad: float) -> None:
        """Order images by aspect ratio so each batch needs little padding; compute batch shapes."""
        order = (self.shapes[:, 1] / self.shapes[:, 0]).argsort(kind="stable")
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes = self.shapes[order]
        self.batch_shapes = rect_batch_shapes(self.shapes, self.batch, self.img_size, self.stride, pad)

    def _cache_images(self, mode: bool | str) -> None:
        """'ram' (or True): keep resized images in memory; 'disk': write decoded images as .npy beside them."""
        mode = "ram" if mode is True else mode
        if mode not in ("ram", "disk"):
            raise ValueError(f"cache must be 'ram', 'disk' or None, got {mode!r}")
        if mode == "ram" and not self._ram_fits():
            return
        work = self._write_npy if mode == "disk" else self._read_resized
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for i, im in enumerate(pool.map(work, range(self.n))):
                if mode == "ram":
                    self.ims[i] = im
        LOGGER.info(f"{self.prefix}cached {self.n} images ({mode})")

    def _ram_fits(self) -> bool:
        scale = self.img_size / self.shapes.max(1)
        need = float((self.shapes.prod(1) * 3 * scale**2).sum())
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return True
        if need > 0.9 * avail:
            LOGGER.warning(
                f"{self.prefix}WARNING: not caching images in RAM, need {need / 2**30:.1f} GB "
                f"of {avail / 2**30:.1f} GB available"
            )
            return False
        return True

    def _write_npy(self, i: int) -> None:
        if not os.path.exists(self.npy_files[i]):
            np.save(self.npy_files[i], self._decode(i), allow_pickle=False)

    def _read_resized(self, i: int) -> np.ndarray:
        return resize_long_side(self._decode(i), self.img_size, self.augment)

    def _decode(self, i: int) -> np.ndarray:
        im = imread(self.im_files[i])
        if im is None:
            raise FileNotFoundError(f"image became unreadable after verification: {self.im_files[i]}")
        return im

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Image i resized so its long side is img_size: (BGR uint8 (h, w, 3), (h0, w0), (h, w))."""
        w0, h0 = (int(v) for v in self.shapes[i])
        im = self.ims[i]
        if im is None:
            npy = self.npy_files[i]
            im = np.load(npy, allow_pickle=False) if os.path.exists(npy) else self._decode(i)
            im = resize_long_side(im, self.img_size, self.augment)
        return im, (h0, w0), im.shape[:2]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, Any]:
        """One sample: (uint8 (3, H, W) RGB, float (n, 6) [0, class, xc, yc, w, h], path, shapes)."""
        hyp = self.hyp or {}
        if self.mosaic and self.rng.random() < hyp["mosaic"]:
            im, labels = self._load_mosaic(index)
            shapes = None
            if self.rng.random() < hyp["mixup"]:
                im, labels = mixup(
                    im, labels, *self._load_mosaic(int(self.rng.choice(self.indices))), self.rng
                )
        else:
            im, labels, shapes = self._load_letterboxed(index)

        h, w = im.shape[:2]
        labels = labels.astype(np.float32).reshape(-1, 5)
        labels[:, 1:] = xyxy2xywhn(labels[:, 1:], w=w, h=h, clip=True, eps=1e-3)
        if self.augment:
            im, labels = self._colour_and_flips(im, labels, hyp)

        out = torch.zeros((len(labels), 6))
        out[:, 1:] = torch.from_numpy(labels)
        chw_rgb = np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])
        return torch.from_numpy(chw_rgb), out, self.im_files[index], shapes

    def _colour_and_flips(
        self, im: np.ndarray, labels: np.ndarray, hyp: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        im = augment_hsv(im, self.rng, hgain=hyp["hsv_h"], sgain=hyp["hsv_s"], vgain=hyp["hsv_v"])
        if self.rng.random() < hyp["flipud"]:
            im, labels = flip_ud(im, labels)
        if self.rng.random() < hyp["fliplr"]:
            im, labels = flip_lr(im, labels)
        return im, labels

    def _perspective_kwargs(self) -> dict[str, float]:
        keys = ("degrees", "translate", "scale", "shear", "perspective")
        return {k: float(self.hyp[k]) for k in keys} if self.hyp else {}

    def _load_letterboxed(self, index: int) -> tuple[np.ndarray, np.ndarray, Any]:
        """Image letterboxed to img_size (or its rect batch shape); labels (n, 5) pixel xyxy."""
        im, (h0, w0), (h, w) = self.load_image(index)
        shape = tuple(self.batch_shapes[self.batch[index]]) if self.rect else self.img_size
        im, (rw, rh), (padw, padh) = letterbox(im, shape, auto=False, scaleup=self.augment)
        shapes = ((h0, w0), ((h * rh / h0, w * rw / w0), (padw, padh)))
        lb = self.labels[index]
        labels = np.concatenate([lb[:, :1], xywhn2xyxy(lb[:, 1:], rw * w, rh * h, padw, padh)], axis=1)
        if self.augment:
            im, labels = random_perspective(im, labels, self.rng, **self._perspective_kwargs())
        return im, labels, shapes

    def _load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image plus 3 random others as a mosaic, then random affine; labels (n, 5) pixel xyxy."""
        s = self.img_size
        picks = [index] + [int(i) for i in self.rng.choice(self.indices, size=3)]
        ims, labs = [], []
        for i in picks:
            im, _, (h, w) = self.load_image(i)
            lb = self.labels[i]
            ims.append(im)
            labs.append(np.concatenate([lb[:, :1], xywhn2xyxy(lb[:, 1:], w, h)], axis=1))
        lo, hi = -self.mosaic_border[0], 2 * s + self.mosaic_border[0]
        center = (int(self.rng.uniform(lo, hi)), int(self.rng.uniform(lo, hi)))
        canvas, labels = mosaic4(ims, labs, s, center)
        return random_perspective(
            canvas, labels, self.rng, **self._perspective_kwargs(), border=self.mosaic_border
        )

    @staticmethod
    def collate_fn(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """Stack images; concatenate targets writing each one's image index into column 0."""
        ims, labels, paths, shapes = zip(*batch, strict=True)
        for i, lb in enumerate(labels):
            lb[:, 0] = i
        return torch.stack(ims, 0), torch.cat(labels, 0), paths, shapes

    @staticmethod
    def collate_fn4(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """Quad collate: every 4 samples become one image at 2x size, either the first sample upscaled
        or the 4 tiled 2x2 (with boxes halved and offset). Batch size must be a multiple of 4."""
        ims, labels, paths, shapes = zip(*batch, strict=True)
        n = len(ims) // 4
        ims4, labels4 = [], []
        offsets = torch.tensor(
            [[0.0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0]]
        )
        for i in range(n):
            j = 4 * i
            if torch.rand(1).item() < 0.5:
                big = torch.nn.functional.interpolate(ims[j][None].float(), scale_factor=2.0, mode="bilinear")
                ims4.append(big[0].round().clamp(0, 255).to(torch.uint8))
                lb = labels[j].clone()
            else:
                top = torch.cat((ims[j], ims[j + 1]), 2)
                bottom = torch.cat((ims[j + 2], ims[j + 3]), 2)
                ims4.append(torch.cat((top, bottom), 1))
                scale = torch.tensor([1.0, 1, 0.5, 0.5, 0.5, 0.5])
                lb = torch.cat([(labels[j + k] + offsets[k]) * scale for k in range(4)], 0)
            lb[:, 0] = i
            labels4.append(lb)
        return torch.stack(ims4, 0), torch.cat(labels4, 0), paths[::4][:n], shapes[::4][:n]


class IndexMapSampler(Sampler[int]):
    """Draws positions from a base sampler and maps them through ``dataset.indices``.

    The mapping runs in the main process, so a trainer assigning new image-weighted
    ``dataset.indices`` each epoch takes effect even with persistent workers.
    """

    def __init__(self, base: Sampler[int], dataset: LoadImagesAndLabels) -> None:
        self.base, self.dataset = base, dataset

    def __iter__(self) -> Iterator[int]:
        indices = self.dataset.indices
        return (int(indices[i]) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to a DistributedSampler so each epoch shuffles differently."""
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)


def seed_worker(worker_id: int) -> None:
    """Give each worker's dataset copy its own generator derived from the loader's seeded generator.

    Also limits OpenCV to one thread inside the worker process, so workers do not oversubscribe cores,
    and leaves SIGTERM to the main process, as PyTorch's workers leave Ctrl-C: a scheduler or
    ``kill`` signalling the whole process group stops training once (train.py ends it like Ctrl-C)
    and the loader then shuts its workers down; they also exit by themselves if the main process dies.
    """
    info = torch.utils.data.get_worker_info()
    if info is not None:
        info.dataset.rng = np.random.default_rng(torch.initial_seed() % 2**32)
    cv2.setNumThreads(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def create_dataloader(
    path: str | Path | Sequence[str | Path],
    imgsz: int,
    batch_size: int,
    stride: int,
    single_cls: bool = False,
    hyp: dict[str, Any] | None = None,
    augment: bool = False,
    cache: bool | str | None = None,
    pad: float = 0.0,
    rect: bool = False,
    rank: int = -1,
    workers: int = 8,
    image_weights: bool = False,
    quad: bool = False,
    prefix: str = "",
    shuffle: bool = False,
    seed: int = 0,
    nc: int | None = None,
) -> tuple[DataLoader, LoadImagesAndLabels]:
    """Build the dataset and a DataLoader over it; returns (loader, dataset).

    Workers = min(cpu count per GPU, batch size, ``workers``) and persist across epochs. Sampling is
    seeded by ``seed`` (+ rank); with ``rank != -1`` a DistributedSampler shards (and shuffles) the data.
    """
    if rect and shuffle:
        LOGGER.warning(f"{prefix}WARNING: --rect is incompatible with shuffling, using shuffle=False")
        shuffle = False
    dataset = LoadImagesAndLabels(
        path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect, image_weights=image_weights,
        cache_images=cache, single_cls=single_cls, stride=int(stride), pad=pad, prefix=prefix,
        seed=seed + max(rank, 0), nc=nc,
    )  # fmt: skip
    batch_size = min(batch_size, len(dataset))
    n_gpu = max(torch.cuda.device_count(), 1)
    nw = min((os.cpu_count() or 1) // n_gpu, batch_size, workers)
    generator = torch.Generator()
    generator.manual_seed(seed + max(rank, 0))
    if rank != -1:
        base: Sampler[int] = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    elif shuffle:
        base = RandomSampler(dataset, generator=generator)
    else:
        base = SequentialSampler(dataset)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=IndexMapSampler(base, dataset),
        num_workers=nw,
        persistent_workers=nw > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=LoadImagesAndLabels.collate_fn4 if quad else LoadImagesAndLabels.collate_fn,
        worker_init_fn=seed_worker,
        generator=generator,
    )
    return loader, dataset


def start_workers(loader: DataLoader) -> None:
    """Start a persistent-worker loader's processes now, while this process is still small.

    Workers are forked, so they share the parent's memory copy-on-write. A loader first iterated
    after a training epoch has grown the heap (kept mapped by ``retain_freed_memory``) leaves the
    next training step to copy every page it writes: the first step after the first validation of
    yolov5-resnet50-cbam at 128 took 5.5 s (236k page faults) instead of 0.5. Later iterations reuse
    these workers; the batches they prefetch now are dropped when the loader is next iterated.
    """
    if loader.num_workers > 0 and loader.persistent_workers:
        iter(loader)
