"""Read and check a dataset YAML (path, train, val, test, names, nc, download).

Path resolution (the YOLOv5 convention): a relative ``path`` is relative to the repository root,
so ``path: ../datasets/shapes`` lands in a ``datasets/`` folder beside the repository. Without
``path`` the repository root itself is the base. ``train``/``val``/``test`` entries are relative
to ``path`` unless absolute.

Missing data: the only thing ``download`` may name is a Python script file inside the repository's
``data/scripts/`` folder; it runs as ``python <script> --out <path>`` (no shell). URLs, shell
commands and inline code are refused; nothing from the YAML is ever evaluated.
"""

from __future__ import annotations

import reprlib
import subprocess
import sys
from pathlib import Path
from typing import Any

from utils.general import LOGGER, ROOT, yaml_load

SCRIPTS_DIR = ROOT / "data" / "scripts"
DOWNLOAD_TIMEOUT_S = 3600


def _source(data: Any) -> str:
    return str(data) if isinstance(data, (str, Path)) else "dataset dict"


def _find_yaml(data: str | Path) -> Path:
    """A YAML path as given, or a bare name looked up in the repository's data/ folder."""
    p = Path(data)
    for candidate in (p, ROOT / "data" / p, ROOT / p):
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"dataset YAML not found: {data} (also looked in {ROOT / 'data'})")


def parse_names(raw: dict[str, Any], source: str) -> dict[int, str]:
    """``names`` as a list or a {id: name} dict (ids 0..nc-1), or generated from ``nc`` alone."""
    names = raw.get("names")
    nc = raw.get("nc")
    if names is None:
        if not isinstance(nc, int) or nc < 1:
            raise ValueError(f"{source}: needs 'names' (list or dict) or a positive integer 'nc'")
        names = [f"class{i}" for i in range(nc)]
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if not isinstance(names, dict):
        raise ValueError(f"{source}: 'names' must be a list or a dict, got {type(names).__name__}")
    not_text = [k for k, v in names.items() if not isinstance(v, (str, int, float))]
    if not_text:  # also stops YAML alias bombs, which expand only when turned into strings
        raise ValueError(f"{source}: 'names' entries must be strings, got a {type(names[not_text[0]]).__name__} "
                         f"for class {not_text[0]!r}")  # fmt: skip
    try:
        parsed = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{source}: 'names' keys must be integer class ids, got {list(names)}") from None
    if sorted(parsed) != list(range(len(parsed))):
        raise ValueError(
            f"{source}: 'names' ids must be 0..{len(parsed) - 1} without gaps, got {sorted(parsed)}"
        )
    if nc is not None and nc != len(parsed):
        raise ValueError(
            f"{source}: nc={nc} does not match the {len(parsed)} entries in 'names'; "
            "make them agree or drop 'nc'"
        )
    return dict(sorted(parsed.items()))


def _resolve_split(value: Any, base: Path, key: str, source: str) -> str | list[str] | None:
    """A split entry (str or list of str) made absolute against ``base``."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, (str, Path)) for v in items):
        raise ValueError(f"{source}: '{key}' must be a path or a list of paths, got {value!r}")
    out = [str(p if Path(p).is_absolute() else (base / p).resolve()) for p in map(Path, items)]
    return out if isinstance(value, (list, tuple)) else out[0]


def _missing_paths(cfg: dict[str, Any]) -> list[str]:
    paths = []
    for key in ("train", "val"):
        v = cfg[key]
        paths += v if isinstance(v, list) else [v]
    return [p for p in paths if not Path(p).exists()]


def resolve_download_script(download: Any) -> Path | None:
    """The script file ``download`` names if it is a .py file inside data/scripts/, else None."""
    if not isinstance(download, str) or "\n" in download or download.strip() != download:
        return None
    if "://" in download:
        return None
    candidate = Path(download)
    candidate = (candidate if candidate.is_absolute() else ROOT / candidate).resolve()
    scripts = SCRIPTS_DIR.resolve()
    if candidate.suffix != ".py" or scripts not in candidate.parents or not candidate.is_file():
        return None
    return candidate


def _fetch(cfg: dict[str, Any], missing: list[str], source: str, autodownload: bool) -> None:
    """Run the dataset's download script if allowed; raise with a placement hint otherwise."""
    where = f"Place the dataset at {cfg['path']} so that these exist: {', '.join(missing)}"
    download = cfg.get("download")
    if not download or not autodownload:
        raise FileNotFoundError(f"{source}: dataset not found. {where}")
    script = resolve_download_script(download)
    if script is None:
        raise ValueError(
            f"{source}: refusing 'download' value {str(download)[:80]!r}: only a .py script file inside "
            f"{SCRIPTS_DIR} is run (URLs and inline code are not). {where}"
        )
    LOGGER.info(f"Dataset not found, running {script} --out {cfg['path']}")
    cmd = [sys.executable, str(script), "--out", str(cfg["path"])]
    proc = subprocess.run(cmd, cwd=ROOT, timeout=DOWNLOAD_TIMEOUT_S, check=False)
    still = _missing_paths(cfg)
    if proc.returncode != 0 or still:
        raise FileNotFoundError(
            f"{source}: {script.name} exited with code {proc.returncode}"
            + (f" and these are still missing: {', '.join(still)}" if still else "")
        )


def check_dataset(data: str | Path | dict[str, Any], autodownload: bool = True) -> dict[str, Any]:
    """Load, validate and resolve a dataset description.

    Args:
        data: a YAML path (a bare name is also looked up in data/) or an already-loaded dict.
        autodownload: run the ``download`` script when train/val are missing.

    Returns:
        The YAML's keys plus absolute ``path``; ``train``/``val``/``test`` as absolute str or list of
        str (``test`` may be None); ``names`` as dict[int, str]; ``nc`` int; ``yaml_file`` (str or None).

    Raises:
        FileNotFoundError: YAML or data missing (and not fetched). ValueError: bad keys or values.
    """
    if isinstance(data, dict):
        cfg, yaml_file = dict(data), None
    else:
        yaml_file = _find_yaml(data)
        cfg = yaml_load(yaml_file)
    source = str(yaml_file) if yaml_file else _source(data)
    for key in ("train", "val"):
        if not cfg.get(key):
            raise ValueError(f"{source}: missing required key '{key}' (a folder, .txt list or list of these)")
    cfg["names"] = parse_names(cfg, source)
    cfg["nc"] = len(cfg["names"])

    root = cfg.get("path") or ""
    if not isinstance(root, (str, Path)):
        raise ValueError(f"{source}: 'path' must be the dataset folder, got {reprlib.repr(root)}")
    base = Path(root)
    base = (base if base.is_absolute() else ROOT / base).resolve()
    cfg["path"] = str(base)
    for key in ("train", "val", "test"):
        cfg[key] = _resolve_split(cfg.get(key), base, key, source)
    cfg["yaml_file"] = str(yaml_file) if yaml_file else None

    missing = _missing_paths(cfg)
    if missing:
        _fetch(cfg, missing, source, autodownload)
    return cfg
