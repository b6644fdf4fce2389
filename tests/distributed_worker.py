"""Worker script for tests/test_distributed.py: runs the Trainer as one rank of a torch.distributed job.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py MODE OUT ARGS...
    python tests/distributed_worker.py step OUT ARGS...          # the same on a single process

MODE ``step``: build a Trainer from the train.py ARGS, take the first (global) batch and make one optimizer
step with BatchNorm in eval mode, no warmup and no accumulation; each rank writes its weights and the
image paths of its batch to OUT/rank<r>/ (the harness's files, not the trainer's). With ``--fit`` the
Trainer then trains for the epochs in ARGS.
MODE ``fail``: train through ``run_training`` (as train.py does), but rank 1 raises at its second iteration.

Each rank trains into its own --project/rank<r> folder so that the test can see which rank wrote what,
and logs at INFO with a ``[rank r]`` prefix.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from train import parse_opt  # noqa: E402
from utils.distributed import run_training, setup_ddp, sigterm_as_exit  # noqa: E402
from utils.general import LOGGER, yaml_load  # noqa: E402
from utils.torch_utils import de_parallel  # noqa: E402
from utils.trainer import Trainer  # noqa: E402


def rank_logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    LOGGER.handlers = [handler]
    LOGGER.propagate = False
    LOGGER.setLevel(logging.INFO)


def one_step(trainer: Trainer, out: Path) -> None:
    """One optimizer step on the first batch; BatchNorm uses its running statistics (eval mode)."""
    model = trainer.model
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    trainer.epoch, trainer.last_opt_step, trainer.accumulate = 0, -1, 1
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in de_parallel(model).state_dict().items()}, out / "before.pt")
    imgs, targets, paths, _ = next(iter(trainer.train_loader))
    trainer._step(imgs.to(trainer.device).float() / 255, targets.to(trainer.device), ni=0)
    state = {k: v.detach().cpu().clone() for k, v in de_parallel(model).state_dict().items()}
    torch.save(state, out / "weights.pt")
    (out / "batch.txt").write_text("\n".join(Path(p).name for p in paths) + "\n")
    (out / "targets.txt").write_text(f"{targets.shape[0]}\n")


def fail_on_second_step() -> None:
    """Make Trainer._step raise on its second call in this process."""
    step = Trainer._step
    calls = []

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("deliberate failure on rank 1 (test)")
        return step(self, *args, **kwargs)

    Trainer._step = failing_step


def main(argv: list[str]) -> int:
    mode, out, *train_args = argv
    fit = "--fit" in train_args
    train_args = [a for a in train_args if a != "--fit"]
    rank, world = int(os.environ.get("RANK", -1)), int(os.environ.get("WORLD_SIZE", 1))
    rank_logging(rank)
    opt = parse_opt(train_args)
    opt.save_dir = str(Path(opt.project) / f"rank{max(rank, 0)}")
    hyp = yaml_load(opt.hyp)
    device = torch.device("cpu")
    if mode == "fail":
        if rank == 1:
            fail_on_second_step()
        run_training(opt, hyp, device, int(os.environ["LOCAL_RANK"]), rank, world)
        return 0
    with sigterm_as_exit():
        if rank != -1:
            device = setup_ddp(device, int(os.environ["LOCAL_RANK"]))
        try:
            trainer = Trainer(opt, hyp, device, rank=rank, world_size=world)
            one_step(trainer, Path(out) / f"rank{max(rank, 0)}")
            if fit:
                trainer.fit()
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    LOGGER.info("worker done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
