"""Small helpers shared by every script: logging, paths, YAML I/O and argument checks."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]  # repository root
LOGGER = logging.getLogger("yolo")

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")

_COLORS = {"blue": "\033[34m", "bold": "\033[1m", "red": "\033[31m", "green": "\033[32m", "end": "\033[0m"}


def setup_logging(verbose: bool = True, rank: int = -1) -> None:
    """Configure the project logger once; ranks other than 0 only log warnings."""
    level = logging.INFO if verbose and rank in (-1, 0) else logging.WARNING
    if not LOGGER.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    LOGGER.setLevel(level)


def colorstr(*parts: str) -> str:
    """Wrap the last part in ANSI codes named by the earlier parts: colorstr('bold', 'text')."""
    *styles, text = parts if len(parts) > 1 else ("blue", "bold", parts[0])
    return "".join(_COLORS[s] for s in styles) + str(text) + _COLORS["end"]


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of divisor that is >= x."""
    return int(math.ceil(x / divisor) * divisor)


def check_img_size(imgsz: int | list[int], stride: int = 32, floor: int = 0) -> int | list[int]:
    """Round image size(s) up to a multiple of stride, warning when the value changes."""
    sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    new = [max(make_divisible(int(s), int(stride)), floor) for s in sizes]
    if new != sizes:
        LOGGER.warning(f"WARNING: --img-size {imgsz} must be a multiple of max stride {stride}, using {new}")
    return new[0] if isinstance(imgsz, int) else new


def increment_path(path: str | Path, exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """runs/exp -> runs/exp2, runs/exp3 ... unless exist_ok; optionally create the folder."""
    path = Path(path)
    if path.exists() and not exist_ok:
        stem, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        n = 2
        while Path(f"{stem}{sep}{n}{suffix}").exists():
            n += 1
        path = Path(f"{stem}{sep}{n}{suffix}")
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


def check_file(path: str | Path, search_dirs: tuple[Path, ...] = (), what: str = "file") -> Path:
    """Return an existing path, also looking inside search_dirs; raise one clear error otherwise."""
    p = Path(path)
    if p.is_file():
        return p
    for d in search_dirs:
        if (d / p).is_file():
            return d / p
    where = f" (also looked in {', '.join(str(d) for d in search_dirs)})" if search_dirs else ""
    raise FileNotFoundError(f"{what} not found: {path}{where}")


def yaml_load(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; errors name the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:  # the parser recurses per nesting level: '[[[[...' would otherwise crash
        raise ValueError(f"{path}: not valid YAML: nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def yaml_save(path: str | Path, data: dict[str, Any]) -> None:
    """Write plain data as YAML (Paths become strings)."""
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(plain, f, sort_keys=False)


def clean_str(s: str) -> str:
    """Replace characters that are awkward in file names."""
    return re.sub(r"[|@#!¡·$€%&()=?¿^*;:,¨´><+]", "_", s)


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Leave every object alive now (torch and the other imports) out of Python's full collections.

    After its imports a detect/val process holds about 350k objects, and each full (generation 2)
    collection walks them all: about 150 ms on a 2-core CPU, once every 30 or so video frames of
    17 ms. Collected once first, then frozen: frozen objects are still freed by reference counting,
    and are handed back to the collector on exit.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def print_args(args: dict[str, Any], name: str = "") -> None:
    LOGGER.info(colorstr(f"{name}: " if name else "") + ", ".join(f"{k}={v}" for k, v in args.items()))
