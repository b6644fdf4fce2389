"""Verify image/label pairs of a YOLO-format dataset and cache the result.

Each image is decoded once (a truncated or mislabelled file fails here, not mid-training) and each
label file is parsed and checked. Bad pairs are skipped and reported in one summary. The scan
result is cached beside the labels as ``<labels dir>.cache``: an ``.npz`` archive of plain arrays,
read with ``allow_pickle=False`` so loading it can never run code. The cache is keyed by a hash of
every file's path, size and modification time, so editing, adding or removing a file rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from utils.general import LOGGER

CACHE_VERSION = 1
MIN_IMAGE_SIDE = 10  # pixels; smaller images are treated as broken
COORD_TOLERANCE = 1e-3  # normalised coordinates may overshoot 0..1 by this much (then clipped)
MAX_LISTED = 10  # bad files named in the summary
NUM_THREADS = min(8, max(1, (os.cpu_count() or 1)))


class LabelError(ValueError):
    """A label file that cannot be used; the message says why."""


@dataclass
class ScanResult:
    """Outcome of checking one image/label pair.

    ``labels`` is float32 (n, 5) ``[class, xc, yc, w, h]`` normalised; ``shape`` is (w, h) pixels.
    ``error`` is empty for a usable pair, else the reason it is skipped.
    """

    im_file: str
    label_file: str
    shape: tuple[int, int] = (0, 0)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.float32))
    error: str = ""
    missing_label: bool = False
    duplicates: int = 0

    @property
    def ok(self) -> bool:
        return not self.error


def imread(path: str | Path) -> np.ndarray | None:
    """Decode an image file to (H, W, 3) uint8 BGR, or None if it cannot be decoded."""
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def _truncated_jpeg(path: str | Path) -> bool:
    """True for a file that starts like a JPEG (FFD8) but lacks the end-of-image marker FFD9.

    Trailing zero padding after the marker is allowed. Decoders often accept such files silently
    and return a partly grey image, so the check is explicit.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(max(0, size - 64))
        tail = f.read().rstrip(b"\x00")
    return head == b"\xff\xd8" and not tail.endswith(b"\xff\xd9")


def verify_image(path: str | Path) -> tuple[int, int]:
    """Check that an image decodes fully; returns its (w, h) in pixels.

    Raises:
        ValueError: the reason the image is unusable (truncated JPEG, undecodable, too small).
    """
    if _truncated_jpeg(path):
        raise ValueError("truncated JPEG (no end-of-image marker)")
    im = imread(path)
    if im is None:
        raise ValueError("cannot be decoded as an image")
    h, w = im.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ValueError(f"image is {w}x{h} px, smaller than {MIN_IMAGE_SIDE} px")
    return w, h


def _polygon_to_box(row: list[float]) -> list[float]:
    """A segment row ``class x1 y1 x2 y2 ...`` becomes ``class xc yc w h`` of its enclosing box."""
    xs, ys = np.array(row[1::2]), np.array(row[2::2])
    x1, x2, y1, y2 = xs.min(), xs.max(), ys.min(), ys.max()
    return [row[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def _parse_rows(text: str) -> np.ndarray:
    """Parse label text to (n, 5) float32; polygon rows (class + >= 3 xy pairs) become boxes."""
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise LabelError(f"line {line_no}: non-numeric value in {line.strip()!r}") from None
        if len(values) != 5 and not (len(values) >= 7 and len(values) % 2 == 1):
            raise LabelError(f"line {line_no}: {len(values)} columns, expected 5 (class xc yc w h)")
        rows.append(values if len(values) == 5 else _polygon_to_box(values))
    with np.errstate(over="ignore"):  # 1e40 becomes inf in float32 and is then refused as non-finite
        return np.array(rows, dtype=np.float32).reshape(-1, 5)


def parse_label_file(path: str | Path) -> tuple[np.ndarray, int]:
    """Read and check one label file.

    Returns:
        (labels float32 (n, 5) ``[class, xc, yc, w, h]``, number of duplicate rows removed).

    Raises:
        LabelError: wrong column count, non-finite values, non-integer class, coordinates
            outside 0..1 (beyond ``COORD_TOLERANCE``) or boxes with zero width/height.
    """
    labels = _parse_rows(Path(path).read_text(encoding="utf-8-sig", errors="replace"))  # -sig: Windows BOM
    if len(labels) == 0:
        return labels, 0
    if not np.isfinite(labels).all():
        raise LabelError("non-finite value (nan/inf)")
    if (labels[:, 0] != np.round(labels[:, 0])).any():
        raise LabelError(f"non-integer class id(s) {sorted(set(labels[:, 0].tolist()))}")
    coords = labels[:, 1:]
    if (coords < -COORD_TOLERANCE).any() or (coords > 1 + COORD_TOLERANCE).any():
        raise LabelError(f"coordinates outside 0..1 (min {coords.min():.4g}, max {coords.max():.4g})")
    labels[:, 1:] = coords.clip(0, 1)
    if (labels[:, 3:5] <= 0).any():
        raise LabelError("box with zero width or height")
    _, first = np.unique(labels, axis=0, return_index=True)
    duplicates = len(labels) - len(first)
    if duplicates:
        labels = labels[np.sort(first)]
    return labels, duplicates


def scan_pair(im_file: str, label_file: str) -> ScanResult:
    """Verify one image and its label file; never raises for a bad file (see ``ScanResult.error``)."""
    result = ScanResult(im_file, label_file)
    try:
        result.shape = verify_image(im_file)
        if os.path.isfile(label_file):
            result.labels, result.duplicates = parse_label_file(label_file)
        else:
            result.missing_label = True
    except LabelError as e:
        result.error = f"label {label_file}: {e}"
    except (ValueError, OSError) as e:
        result.error = f"image: {e}"
    return result


def scan_pairs(im_files: Sequence[str], label_files: Sequence[str]) -> list[ScanResult]:
    """Verify all pairs using a thread pool (decoding releases the GIL)."""
    with ThreadPoolExecutor(NUM_THREADS) as pool:
        return list(pool.map(scan_pair, im_files, label_files))


def files_hash(paths: Sequence[str]) -> str:
    """SHA-256 over each path with its size and modification time (missing files count too)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def save_cache(path: Path, results: Sequence[ScanResult], key: str) -> bool:
    """Write scan results as an .npz of plain arrays (atomic); returns False if the folder is read-only."""
    labels = [r.labels for r in results]
    arrays = {
        "version": np.array(CACHE_VERSION),
        "hash": np.array(key),
        "im_files": np.array([r.im_file for r in results], dtype=str),
        "label_files": np.array([r.label_file for r in results], dtype=str),
        "shapes": np.array([r.shape for r in results], dtype=np.int64).reshape(-1, 2),
        "counts": np.array([len(lb) for lb in labels], dtype=np.int64),
        "labels": np.concatenate(labels, 0) if labels else np.zeros((0, 5), np.float32),
        "errors": np.array([r.error for r in results], dtype=str),
        "missing": np.array([r.missing_label for r in results], dtype=bool),
        "duplicates": np.array([r.duplicates for r in results], dtype=np.int64),
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        LOGGER.warning(f"WARNING: cache not saved, {path.parent} is not writeable ({e})")
        tmp.unlink(missing_ok=True)
        return False
    return True


def load_cache(path: Path, key: str) -> list[ScanResult] | None:
    """Read a cache written by ``save_cache``; None if absent, unreadable, stale or another version."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or str(z["hash"]) != key:
                return None
            counts = z["counts"]
            per_image = (
                np.split(z["labels"].astype(np.float32), np.cumsum(counts)[:-1]) if len(counts) else []
            )
            return [
                ScanResult(str(f), str(lf), (int(s[0]), int(s[1])), lb, str(e), bool(m), int(d))
                for f, lf, s, lb, e, m, d in zip(
                    z["im_files"],
                    z["label_files"],
                    z["shapes"],
                    per_image,
                    z["errors"],
                    z["missing"],
                    z["duplicates"],
                    strict=True,
                )
            ]
    except (OSError, ValueError, KeyError) as e:
        LOGGER.warning(f"WARNING: ignoring unreadable label cache {path} ({e})")
        return None


def summarize(results: Sequence[ScanResult], prefix: str = "", max_listed: int = MAX_LISTED) -> str:
    """One line of counts, logged at INFO; one WARNING naming up to ``max_listed`` bad files and why."""
    bad = [r for r in results if not r.ok]
    good = [r for r in results if r.ok]
    missing = sum(r.missing_label for r in good)
    empty = sum(len(r.labels) == 0 and not r.missing_label for r in good)
    dup_files = [r for r in good if r.duplicates]
    line = (
        f"{prefix}{len(good)} images usable, {len(bad)} skipped as corrupt, "
        f"{missing} without label file (background), {empty} with empty labels"
    )
    LOGGER.info(line)
    if dup_files:
        total = sum(r.duplicates for r in dup_files)
        LOGGER.warning(
            f"{prefix}WARNING: removed {total} duplicate label rows in {len(dup_files)} files, e.g. "
            + ", ".join(r.label_file for r in dup_files[:3])
        )
    if bad:
        listed = "\n".join(f"  {r.im_file}: {r.error}" for r in bad[:max_listed])
        more = f"\n  ... and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
        LOGGER.warning(f"{prefix}WARNING: skipped {len(bad)} corrupt image/label pairs:\n{listed}{more}")
    return line


def check_class_ids(
    labels: Sequence[np.ndarray], label_files: Sequence[str], nc: int | None, max_listed: int = MAX_LISTED
) -> None:
    """Raise if any class id is negative or, when ``nc`` is given, >= nc.

    Raises:
        ValueError: naming the number of classes, the offending ids and up to ``max_listed`` files.
    """
    offenders = []
    for lb, f in zip(labels, label_files, strict=True):
        cls = lb[:, 0]
        bad = cls[(cls < 0) | (cls >= nc)] if nc is not None else cls[cls < 0]
        if bad.size:
            offenders.append((f, sorted({int(c) for c in bad})))
    if not offenders:
        return
    ids = sorted({c for _, cs in offenders for c in cs})
    listed = "\n".join(f"  {f}: class {cs}" for f, cs in offenders[:max_listed])
    more = f"\n  ... and {len(offenders) - max_listed} more files" if len(offenders) > max_listed else ""
    valid = f"0..{nc - 1} (nc={nc} in the dataset YAML)" if nc is not None else ">= 0"
    raise ValueError(
        f"{len(offenders)} label files have class ids {ids} outside the valid range {valid}. "
        f"Fix the labels or the dataset's names/nc:\n{listed}{more}"
    )
