"""Hyperparameter evolution: mutate the best hyperparameters so far, train, keep score in evolve.csv."""

from __future__ import annotations

import csv
from argparse import Namespace
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

from utils.general import LOGGER, colorstr, yaml_load, yaml_save
from utils.metrics import fitness

# key: (mutation scale 0..1, lower limit, upper limit)
SEARCH_SPACE: dict[str, tuple[float, float, float]] = {
    "lr0": (1, 1e-5, 1e-1), "lrf": (1, 0.01, 1.0), "momentum": (0.3, 0.6, 0.98),
    "weight_decay": (1, 0.0, 0.001), "warmup_epochs": (1, 0.0, 5.0), "warmup_momentum": (1, 0.0, 0.95),
    "warmup_bias_lr": (1, 0.0, 0.2), "box": (1, 0.02, 0.2), "cls": (1, 0.2, 4.0), "cls_pw": (1, 0.5, 2.0),
    "obj": (1, 0.2, 4.0), "obj_pw": (1, 0.5, 2.0), "iou_t": (0, 0.1, 0.7), "anchor_t": (1, 2.0, 8.0),
    "fl_gamma": (0, 0.0, 2.0), "hsv_h": (1, 0.0, 0.1), "hsv_s": (1, 0.0, 0.9), "hsv_v": (1, 0.0, 0.9),
    "degrees": (1, 0.0, 45.0), "translate": (1, 0.0, 0.9), "scale": (1, 0.0, 0.9), "shear": (1, 0.0, 10.0),
    "perspective": (0, 0.0, 0.001), "flipud": (1, 0.0, 1.0), "fliplr": (0, 0.0, 1.0), "mosaic": (1, 0.0, 1.0),
    "mixup": (1, 0.0, 1.0), "copy_paste": (1, 0.0, 1.0),
}  # fmt: skip
METRIC_KEYS = ["P", "R", "mAP50", "mAP50-95", "val_box", "val_obj", "val_cls"]


def mutate(
    hyp: dict[str, float], rng: np.random.Generator, mp: float = 0.8, sigma: float = 0.2
) -> dict[str, float]:
    """Multiply each searchable value by a random gain (never all 1), then clip to its limits."""
    keys = [k for k in SEARCH_SPACE if k in hyp]
    scales = np.array([SEARCH_SPACE[k][0] for k in keys])
    gains = np.ones(len(keys))
    while (gains == 1).all():
        gains = (
            scales * (rng.random(len(keys)) < mp) * rng.standard_normal(len(keys)) * rng.random() * sigma + 1
        )
        gains = gains.clip(0.3, 3.0)
    out = dict(hyp)
    for k, g in zip(keys, gains):
        _, lo, hi = SEARCH_SPACE[k]
        out[k] = round(float(np.clip(hyp[k] * g, lo, hi)), 5)
    return out


def select_parent(rows: list[dict[str, float]], rng: np.random.Generator, top: int = 5) -> dict[str, float]:
    """Fitness-weighted choice among the best `top` generations so far."""
    ranked = sorted(rows, key=lambda r: r["fitness"], reverse=True)[:top]
    w = np.array([r["fitness"] for r in ranked]) - min(r["fitness"] for r in ranked) + 1e-6
    return ranked[int(rng.choice(len(ranked), p=w / w.sum()))]


def _read(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _append(path: Path, results: tuple[float, ...], hyp: dict[str, float]) -> None:
    row = dict(zip(METRIC_KEYS, results))
    row["fitness"] = float(fitness(np.array(results[:4]).reshape(1, -1))[0])
    row.update({k: hyp[k] for k in SEARCH_SPACE if k in hyp})
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def evolve(opt: Namespace, device: torch.device) -> Path:
    """Run opt.evolve generations; writes evolve.csv and hyp_evolve.yaml into opt.save_dir."""
    from utils.trainer import Trainer

    save_dir = Path(opt.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    csv_path = save_dir / "evolve.csv"
    base = yaml_load(opt.hyp)
    rng = np.random.default_rng(opt.seed)
    for gen in range(opt.evolve):
        rows = _read(csv_path)
        hyp = (
            mutate({**base, **{k: v for k, v in select_parent(rows, rng).items() if k in base}}, rng)
            if rows
            else base
        )
        run_opt = deepcopy(opt)
        run_opt.save_dir, run_opt.noval, run_opt.nosave = str(save_dir / f"gen{gen}"), True, True
        LOGGER.info(f"{colorstr('evolve:')} generation {gen + 1}/{opt.evolve}")
        results = Trainer(run_opt, hyp, device).fit()
        _append(csv_path, results, hyp)
    best = max(_read(csv_path), key=lambda r: r["fitness"])
    yaml_save(save_dir / "hyp_evolve.yaml", {**base, **{k: best[k] for k in SEARCH_SPACE if k in best}})
    LOGGER.info(f"{colorstr('evolve:')} done; best fitness {best['fitness']:.4f}, hyperparameters in "
                f"{save_dir / 'hyp_evolve.yaml'}")  # fmt: skip
    return save_dir / "hyp_evolve.yaml"
