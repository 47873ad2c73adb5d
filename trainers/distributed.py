"""Data-parallel helpers of the trainers: rank and world size, scalar all-reduces, DeepSpeed ZeRO set-up.

Single process without DeepSpeed; ZeRO-3 through DeepSpeed when launched with several ranks (``deepspeed`` /
``torchrun``) and ``run.deepspeed=true``.
"""

from __future__ import annotations

import torch


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce(value: float, device, op: str = "sum") -> float:
    """Sum (or max) of a scalar over ranks; the value itself without distributed training."""
    if rank_world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    reduce_op = torch.distributed.ReduceOp
    torch.distributed.all_reduce(t, op=reduce_op.MAX if op == "max" else reduce_op.SUM)
    return float(t.item())


# ZeRO-3 re-partitions a frozen parameter (the norms beside LoRA, NF4 codes) in place after each submodule's
# forward, also inside a non-reentrant checkpoint recompute, which then finds it shrunk to shape [0]
# (CheckpointError); DeepSpeed 0.19.3 keeps frozen parameters gathered during a recompute (deepspeedai/DeepSpeed
# PR 8148).
DEEPSPEED_FOR_CHECKPOINTING = (0, 19, 3)


def deepspeed_can_checkpoint(version: str) -> bool:
    """Whether this DeepSpeed release recomputes ZeRO-3 layers with frozen parameters correctly."""
    from packaging.version import Version

    return Version(version).release[:3] >= DEEPSPEED_FOR_CHECKPOINTING


def setup_deepspeed(module, opt, sched, *, zero_stage: int, max_grad_norm: float, dtype: str,
                    activation_checkpointing: bool, external_params=()):
    """``deepspeed.initialize`` of ``module`` with the trainer's own optimizer (its named parameter groups) and
    schedule -> (engine, optimizer, scheduler). ``external_params``: parameters ``module``'s forward reads outside
    their own submodule's forward, which ZeRO-3 must gather for it. Raises ``ImportError`` without DeepSpeed
    (naming the extra) and ``RuntimeError`` for activation checkpointing under ZeRO-3 on a DeepSpeed that
    recomputes it wrongly."""
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("run.deepspeed=true needs DeepSpeed: pip install 'memcomp[deepspeed]'") from exc
    if activation_checkpointing and zero_stage == 3 and not deepspeed_can_checkpoint(deepspeed.__version__):
        raise RuntimeError(
            f"activation_checkpointing=true with ZeRO-3 needs DeepSpeed >= 0.19.3 (this is {deepspeed.__version__}: "
            "its recompute of layers with frozen parameters fails); pip install -U 'memcomp[deepspeed]', or set "
            "compressor.activation_checkpointing=false")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "gradient_clipping": max_grad_norm,
                 # overlap_comm issues reduce-scatters from a side stream; with gloo on CPU their order against
                 # the main thread's collectives can differ between ranks (an occasional size mismatch in our
                 # two-rank CPU test). It only pays off with NCCL on GPUs.
                 "zero_optimization": {"stage": zero_stage, "overlap_comm": torch.cuda.is_available()},
                 "bf16": {"enabled": dtype == "bfloat16"}, "fp16": {"enabled": False},
                 "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if zero_stage == 3:
        for p in external_params:
            deepspeed.zero.register_external_parameter(module, p)
    engine, opt, _, sched = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine, opt, sched


def wants_deepspeed(deepspeed_flag: bool) -> bool:
    """ZeRO runs when asked for and launched with more than one rank."""
    import os

    return deepspeed_flag and int(os.environ.get("WORLD_SIZE", "1")) > 1


def finish() -> None:
    """End of a distributed run: every rank waits for the others (rank 0 may still be writing the compressor),
    then the process group is shut down. A rank that exits while a peer is still inside gloo can abort the
    process ("terminate called without an active exception", seen on a two-rank CPU run). No-op without
    torch.distributed."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_cli(prog: str, stages: tuple[str, ...], argv, train) -> int:
    """A trainer's command line: parse the options (``config_from_cli``), train, ``finish()``. A bad option or value
    (``ValueError``), bad or missing data (``DataError``), a missing file (``FileNotFoundError``, e.g. ``init_from``)
    or a data folder that is not the demo's (``FileExistsError``) is printed as one line naming it, exit status 2,
    as argparse does for its own errors; anything else propagates with its traceback."""
    import sys

    from memcomp.trainers.config import config_from_cli

    from memcomp.data import DataError

    try:
        cfg = config_from_cli(prog, stages, argv)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except (DataError, FileNotFoundError, FileExistsError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    finish()  # on success only: after a failure a barrier could wait for a dead rank
    return 0
