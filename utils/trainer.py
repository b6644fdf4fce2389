"""The training loop: one Trainer object owns model, optimizer, EMA, data and checkpoints for a run.

train.py parses the command line and calls ``Trainer(opt, hyp, device).fit()``; each step of the
loop is its own small method so that the whole reads top to bottom.
"""

from __future__ import annotations

import math
import random
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from utils.autoanchor import check_anchors
from utils.callbacks import Callbacks, ResultsLogger
from utils.checkpoints import build_checkpoint, for_inference, resume_epoch, save_checkpoint
from utils.dataloaders import create_dataloader, start_workers
from utils.dataset_config import check_dataset
from utils.distributed import GlobalMeanLoss, local_main_first
from utils.general import LOGGER, check_img_size, colorstr, yaml_save
from utils.loss import ComputeLoss
from utils.metrics import fitness
from utils.optim import apply_warmup, build_optimizer, epochs_within_budget, lr_lambda, warmup_iterations
from utils.torch_utils import (
    ModelEMA,
    conv_memory_format,
    de_parallel,
    half_dtype,
    init_seeds,
    retain_freed_memory,
)
from utils.train_setup import build_model, class_weights, freeze_layers, image_weights

NOMINAL_BATCH = 64  # default; a hyp file may set `nbs`


class TrainingDiverged(RuntimeError):
    """Loss became NaN or infinite; the last good checkpoint is kept."""


def _amp_description(dtype: torch.dtype | None, device: torch.device, no_amp: bool) -> str:
    if no_amp:
        return "off (--no-amp), fp32"
    if dtype == torch.float16:
        return "float16 autocast with gradient scaling (--no-amp: fp32)"
    if dtype == torch.bfloat16:
        return "bfloat16 autocast, native on this CPU (--no-amp: fp32)"
    return f"off, fp32: no faster precision on {device}" + (
        " (no native bf16)" if device.type == "cpu" else ""
    )


class Trainer:
    def __init__(self, opt: Namespace, hyp: dict[str, Any], device: torch.device, rank: int = -1,
                 world_size: int = 1, callbacks: Callbacks | None = None):  # fmt: skip
        self.opt, self.hyp, self.device = opt, dict(hyp), device
        self.rank, self.world_size = rank, world_size
        self.main = rank in (-1, 0)
        self.callbacks = callbacks or Callbacks()
        self.save_dir = Path(opt.save_dir)
        self.wdir = self.save_dir / "weights"
        self.last, self.best = self.wdir / "last.pt", self.wdir / "best.pt"
        self.plots = not opt.evolve and not opt.noplots
        self.cuda = device.type == "cuda"
        # AMP: fp16 with a gradient scaler on CUDA; bf16 (no scaler needed) on a CPU with native bf16
        self.amp_dtype = None if opt.no_amp else half_dtype(device)
        init_seeds(opt.seed + 1 + max(rank, 0), deterministic=True)
        if self.main:
            self.wdir.mkdir(parents=True, exist_ok=True)
            yaml_save(self.save_dir / "hyp.yaml", self.hyp)
            yaml_save(self.save_dir / "opt.yaml", vars(opt))
        with local_main_first():  # one process per machine may run the dataset's download script
            self.data = check_dataset(opt.data)  # clear errors before any model is built
        self.nc = 1 if opt.single_cls else int(self.data["nc"])
        self.names = {0: "item"} if opt.single_cls and len(self.data["names"]) != 1 else self.data["names"]
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()

    # ----------------------------------------------------------------------------------------------- set-up
    def _setup_model(self) -> None:
        opt = self.opt
        model, ckpt = build_model(opt.weights, opt.cfg, self.nc, self.hyp, bool(opt.resume))
        self.ckpt = ckpt
        model.names = dict(self.names)
        self.memory_format = conv_memory_format(self.device)
        if self.device.type == "cpu":
            retain_freed_memory()  # no page faults on each step's activations
        self.model = model.to(self.device, memory_format=self.memory_format)
        freeze_layers(self.model, opt.freeze)
        self.gs = max(int(self.model.stride.max()), 32)
        self.imgsz = check_img_size(opt.imgsz, self.gs, floor=self.gs * 2)
        if self.cuda and rank_is_ddp(self.rank) and opt.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            LOGGER.info("Using SyncBatchNorm()")

    def _setup_data(self) -> None:
        opt, hyp = self.opt, self.hyp
        batch = opt.batch_size // self.world_size
        with local_main_first():  # the label cache is written once, then read by the other ranks
            self.train_loader, self.dataset = create_dataloader(
                self.data["train"], self.imgsz, batch, self.gs, opt.single_cls, hyp=hyp, augment=True,
                cache=opt.cache, rect=opt.rect, rank=self.rank, workers=opt.workers,
                image_weights=opt.image_weights, quad=opt.quad, prefix=colorstr("train: "), shuffle=True,
                seed=opt.seed, nc=self.nc,
            )  # fmt: skip
        self.val_loader = None
        if self.main:
            self.val_loader, _ = create_dataloader(
                self.data["val"], self.imgsz, batch * 2, self.gs, opt.single_cls, hyp=hyp, cache=None if opt.noval else opt.cache,
                rect=True, rank=-1, workers=opt.workers * 2, pad=0.5, prefix=colorstr("val: "), nc=self.nc,
            )  # fmt: skip
            start_workers(self.val_loader)  # forked before training grows the heap (see start_workers)
            if not opt.resume:
                if not opt.noautoanchor:
                    check_anchors(self.dataset, self.model, thr=hyp["anchor_t"], imgsz=self.imgsz)
                if self.plots:
                    from utils.plots import plot_labels

                    labels = np.concatenate(
                        [lab for lab in self.dataset.labels if len(lab)] or [np.zeros((0, 5))]
                    )
                    plot_labels(labels, self.names, self.save_dir)
        if rank_is_ddp(self.rank):  # every rank starts from rank 0's (possibly refitted) anchors
            dist.broadcast(self.model.detect.anchors, src=0)
        self.nb = len(self.train_loader)
        self.compute_loss = ComputeLoss(
            self.model, hyp, imgsz=self.imgsz, label_smoothing=opt.label_smoothing
        )  # validation (rank 0 only) and single-process training
        self.train_loss = (
            GlobalMeanLoss(self.model, hyp, self.imgsz, opt.label_smoothing, world_size=self.world_size)
            if rank_is_ddp(self.rank)
            else self.compute_loss
        )  # DDP: box/class means over the targets of all ranks, as one process would compute them
        self.model.class_weights = torch.tensor(class_weights(self.dataset.labels, self.nc)) * self.nc

    def _setup_optimizer(self) -> None:
        opt, hyp = self.opt, self.hyp
        self.nbs = int(hyp.get("nbs", NOMINAL_BATCH))  # gradients accumulate up to this nominal batch
        self.accumulate = max(round(self.nbs / opt.batch_size), 1)
        decay = hyp["weight_decay"] * opt.batch_size * self.accumulate / self.nbs  # hyp itself stays as given
        self.optimizer = build_optimizer(self.model, opt.optimizer, hyp["lr0"], hyp["momentum"], decay)
        self.lf = lr_lambda(opt.epochs, hyp["lrf"], opt.cos_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)
        self.ema = ModelEMA(self.model) if self.main else None
        self.start_epoch, self.best_fitness = 0, 0.0
        if self.ckpt is not None and opt.resume:
            self._resume_state(self.ckpt)
        self.scheduler.last_epoch = self.start_epoch - 1
        if rank_is_ddp(self.rank):
            self.model = DDP(self.model, device_ids=[self.device.index] if self.cuda else None)
        # fp16 AMP is CUDA-only, and only fp16 needs its gradients scaled
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.stopper = EarlyStopping(opt.patience)
        self.logger = ResultsLogger(self.save_dir) if self.main and not opt.evolve else None

    def _resume_state(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.ema.load_state_dict(ckpt["ema"])
            self.ema.updates = int(ckpt.get("updates", 0))
        self.best_fitness = float(ckpt.get("best_fitness", 0.0))
        self.start_epoch = resume_epoch(ckpt, self.opt.epochs, self.opt.weights)
        LOGGER.info(
            f"Resuming training from {self.opt.weights} at epoch {self.start_epoch} of {self.opt.epochs}"
        )

    # ------------------------------------------------------------------------------------------------- loop
    def fit(self) -> tuple[float, ...]:
        """Train all epochs; returns the final (P, R, mAP50, mAP50-95, val box, obj, cls)."""
        opt = self.opt
        self.nw = warmup_iterations(self.hyp, self.nb)
        self.last_opt_step = -1
        self.maps = np.zeros(self.nc)
        results: tuple[float, ...] = (0.0,) * 7
        self.callbacks.run("on_pretrain_routine_end", self)
        t0 = time.time()
        LOGGER.info(f"AMP: {_amp_description(self.amp_dtype, self.device, opt.no_amp)}")
        LOGGER.info(f"Image sizes {self.imgsz} train, {self.imgsz} val\nUsing {self.train_loader.num_workers} "
                    f"dataloader workers\nLogging results to {colorstr('bold', self.save_dir)}\n"
                    f"Starting training for {f'{opt.time:g} hours' if opt.time else f'{opt.epochs} epochs'}...")  # fmt: skip
        epoch = self.start_epoch
        train_s, val_s = [], 0.0  # seconds of each epoch's training and of the latest validation (--time)
        while epoch < opt.epochs:
            self.epoch = epoch
            t_epoch = time.time()
            train_losses = self._train_epoch(epoch)
            train_s.append(time.time() - t_epoch)
            if opt.time:
                self._fit_to_budget(epoch, time.time() - t0, float(np.mean(train_s)), val_s)
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.scheduler.step()
            t_val = time.time()
            if self.main:
                results = self._end_epoch(epoch, train_losses, lrs)
            val_s = time.time() - t_val  # the latest: an untrained model's first validations are slow
            epoch += 1
            if self._should_stop():
                break
        if self.main:
            LOGGER.info(
                f"\n{epoch - self.start_epoch} epochs completed in {(time.time() - t0) / 3600:.3f} hours."
            )
            results = self._final_eval(results)
            for f in (self.last, self.best):
                if f.exists():
                    strip_optimizer(f)
            if self.logger:
                self.logger.close()
            self.callbacks.run("on_train_end", self)
        return results

    def _fit_to_budget(self, epoch: int, elapsed_s: float, train_s: float, val_s: float) -> None:
        """--time: re-plan the number of epochs so that training ends within the budget.

        The LR schedule is stretched or shrunk to the new length, so it still spans the whole run. In DDP,
        every rank follows rank 0's plan.
        """
        opt = self.opt
        epochs = epochs_within_budget(epoch, opt.time * 3600, elapsed_s, train_s, val_s)
        if rank_is_ddp(self.rank):
            plan = torch.tensor([float(epochs)], device=self.device if self.cuda else "cpu")
            dist.broadcast(plan, src=0)
            epochs = int(plan.item())
        if epochs == opt.epochs:
            return
        if self.main:
            LOGGER.info(f"--time {opt.time:g} h: {elapsed_s / 60:.1f} min gone after epoch {epoch}; "
                        f"training for {epochs} epoch{'s' * (epochs != 1)} in all")  # fmt: skip
        opt.epochs = epochs
        self.lf = lr_lambda(epochs, self.hyp["lrf"], opt.cos_lr)
        self.scheduler.lr_lambdas = [self.lf] * len(self.optimizer.param_groups)

    def _train_epoch(self, epoch: int) -> np.ndarray:
        model, opt = self.model, self.opt
        model.train()
        if opt.image_weights and self.main:
            cw = de_parallel(model).class_weights.cpu().numpy() * (1 - self.maps) ** 2 / self.nc
            iw = image_weights(self.dataset.labels, self.nc, cw)
            self.dataset.indices = random.choices(range(self.dataset.n), weights=iw, k=self.dataset.n)
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        mloss = torch.zeros(3, device=self.device)
        pbar = enumerate(self.train_loader)
        LOGGER.info(
            ("\n" + "%11s" * 7)
            % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size")
        )
        if self.main:
            pbar = tqdm(pbar, total=self.nb, bar_format="{l_bar}{bar:10}{r_bar}")
        self.optimizer.zero_grad()
        for i, (imgs, targets, paths, _) in pbar:
            ni = i + self.nb * epoch
            imgs = imgs.to(self.device, non_blocking=True).float().div_(255)
            imgs = imgs.contiguous(memory_format=self.memory_format)
            if ni <= self.nw:
                self.accumulate = apply_warmup(self.optimizer, ni, self.nw, epoch, self.hyp, self.lf,
                                               self.nbs, opt.batch_size)  # fmt: skip
            if opt.multi_scale:
                imgs = self._random_scale(imgs)
            loss_items = self._step(imgs, targets.to(self.device), ni)
            mloss = (mloss * i + loss_items) / (i + 1)
            if self.main:
                mem = f"{torch.cuda.memory_reserved() / 1e9 if self.cuda else 0:.3g}G"
                # --time plans the epoch count after the first epoch (a resumed run keeps its plan, no --time)
                last = opt.epochs - 1 if not opt.time or epoch > self.start_epoch else "?"
                pbar.set_description(("%11s" * 2 + "%11.4g" * 5)
                                     % (f"{epoch}/{last}", mem, *mloss, targets.shape[0], imgs.shape[-1]))  # fmt: skip
                if self.plots and epoch == self.start_epoch and i < 3:
                    from utils.plots import plot_images

                    plot_images(imgs, targets, paths, self.save_dir / f"train_batch{i}.jpg", self.names)
                self.callbacks.run("on_train_batch_end", self, i, imgs, targets)
        return mloss.cpu().numpy()

    def _step(self, imgs: torch.Tensor, targets: torch.Tensor, ni: int) -> torch.Tensor:
        """Forward, backward and (every `accumulate` iterations) an optimizer + EMA update."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            pred = self.model(imgs)
            loss, loss_items = self.train_loss(pred, targets)
        if not torch.isfinite(loss).all():
            raise TrainingDiverged(f"loss is {loss.item()} at epoch {self.epoch}, iteration {ni}; stopping. "
                                   f"The last good checkpoint is kept in {self.wdir}. Try a lower --hyp lr0.")  # fmt: skip
        if rank_is_ddp(self.rank):
            loss = loss * self.world_size  # DDP averages gradients across ranks
        if self.opt.quad:
            loss = loss * 4.0
        self.scaler.scale(loss).backward()
        if ni - self.last_opt_step >= self.accumulate:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad()
            if self.ema is not None:
                self.ema.update(self.model)
            self.last_opt_step = ni
        return loss_items

    def _random_scale(self, imgs: torch.Tensor) -> torch.Tensor:
        size = random.randrange(int(self.imgsz * 0.5), int(self.imgsz * 1.5) + self.gs) // self.gs * self.gs
        scale = size / max(imgs.shape[2:])
        if scale == 1:
            return imgs
        shape = [math.ceil(x * scale / self.gs) * self.gs for x in imgs.shape[2:]]
        return nn.functional.interpolate(imgs, size=shape, mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------------------------ validate and save
    def _validate(self, model: nn.Module, plots: bool = False, verbose: bool = False):
        from utils.evaluator import evaluate

        return evaluate(model, self.val_loader, self.names, device=self.device, conf_thres=0.001, iou_thres=0.6,
                        single_cls=self.opt.single_cls, compute_loss=self.compute_loss, half=self.amp_dtype is not None,
                        save_dir=self.save_dir, plots=plots, verbose=verbose)  # fmt: skip

    def _end_epoch(self, epoch: int, train_losses: np.ndarray, lrs: list[float]) -> tuple[float, ...]:
        opt = self.opt
        final = epoch + 1 == opt.epochs or self.stopper.possible_stop
        self.ema.ema.names = dict(self.names)
        results: tuple[float, ...] = (0.0,) * 7
        if not opt.noval or final:
            res = self._validate(self.ema.ema)
            results, self.maps = res.as_tuple(), res.maps
        fi = float(fitness(np.array(results[:4]).reshape(1, -1))[0])
        self.stop = self.stopper(epoch, fi)
        if fi > self.best_fitness:
            self.best_fitness = fi
        if self.logger:
            self.logger.log_epoch(epoch, [*train_losses.tolist(), *results, *lrs])
        self.callbacks.run("on_fit_epoch_end", self, epoch, results, fi)
        if not opt.nosave or final:
            self._save(epoch, fi, final)
        return results

    def _save(self, epoch: int, fi: float, final: bool) -> None:
        ckpt = build_checkpoint(
            de_parallel(self.model), ema=self.ema.ema, optimizer=self.optimizer, epoch=epoch,
            best_fitness=self.best_fitness, train_args=vars(self.opt), hyp=self.hyp, updates=self.ema.updates,
        )  # fmt: skip
        save_checkpoint(ckpt, self.last)
        if self.best_fitness == fi:  # for inference only (--resume takes last.pt): no optimizer state
            save_checkpoint(for_inference(ckpt), self.best)
        if self.opt.save_period > 0 and epoch % self.opt.save_period == 0:
            save_checkpoint(ckpt, self.wdir / f"epoch{epoch}.pt")
        self.callbacks.run("on_model_save", self, self.last, epoch, final)

    def _should_stop(self) -> bool:
        stop = bool(getattr(self, "stop", False))
        if rank_is_ddp(self.rank):  # every rank must leave the loop together
            flag = torch.tensor([float(stop)], device=self.device if self.cuda else "cpu")
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        return stop

    def _final_eval(self, results: tuple[float, ...]) -> tuple[float, ...]:
        """Validate best.pt with plots and per-class table; make results.png."""
        from utils.checkpoints import model_from_checkpoint

        if self.best.exists() and not self.opt.noval:
            LOGGER.info(f"\nValidating {self.best}...")
            model = model_from_checkpoint(self.best, device=self.device, fuse=True)
            results = self._validate(model, plots=self.plots, verbose=True).as_tuple()
        if self.plots and (self.save_dir / "results.csv").exists():
            from utils.plots import plot_results

            plot_results(self.save_dir / "results.csv")
        LOGGER.info(f"Results saved to {colorstr('bold', self.save_dir)}")
        return results


class EarlyStopping:
    """Stop when fitness has not improved for `patience` epochs (0 or less disables it)."""

    def __init__(self, patience: int = 30):
        self.best_fitness, self.best_epoch = 0.0, 0
        self.patience = patience if patience > 0 else float("inf")
        self.possible_stop = False

    def __call__(self, epoch: int, fi: float) -> bool:
        if fi >= self.best_fitness:
            self.best_epoch, self.best_fitness = epoch, fi
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= self.patience - 1
        stop = delta >= self.patience
        if stop:
            LOGGER.info(f"Stopping training early as no improvement observed in last {self.patience} epochs. "
                        f"Best results observed at epoch {self.best_epoch}.")  # fmt: skip
        return stop


def rank_is_ddp(rank: int) -> bool:
    return rank != -1


def strip_optimizer(path: Path) -> None:
    """Finished checkpoint: keep the EMA weights as the model, drop optimizer state (a third of the size)."""
    from utils.checkpoints import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.get("ema") is not None or ckpt.get("optimizer") is not None:
        save_checkpoint(for_inference(ckpt), path)
