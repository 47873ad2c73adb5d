"""The CPT / SFT training loop, and the run bookkeeping every trainer shares (``RunLog``: progress, metrics.jsonl,
runs.jsonl, TensorBoard).

One step: draw ``optim.samples_per_step`` samples from the task mixture; this rank takes samples rank::world,
packs them into rows of at most ``optim.max_tokens`` decoder tokens, and accumulates gradients over its rows
with the loss normalised by the global number of target tokens (so any number of ranks gives the same update);
clip, AdamW step, cosine schedule. Single process without DeepSpeed; ZeRO-3 through DeepSpeed when launched
with several ranks (``deepspeed`` / ``torchrun``) and ``run.deepspeed=true``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import Any

import torch
from memcomp.trainers.build import build_compressor, build_optimizer, build_stream, has_validation, resolve_device
from memcomp.trainers.checkpoint import (
    export_compressor,
    load_checkpoint,
    load_deepspeed_checkpoint,
    open_metrics,
    save_checkpoint,
    save_deepspeed_checkpoint,
)
from memcomp.trainers.config import TrainConfig
from memcomp.trainers.distributed import all_reduce, rank_world, setup_deepspeed, wants_deepspeed
from memcomp.trainers.recipes import prepare

from memcomp.data import DataError
from memcomp.packing import PackingCollator
from memcomp.profiling import nvtx_range
from memcomp.runtime import set_threads

DATA_FILES = ("text_file", "qa_file", "summary_file", "trace_file", "val_text_file", "val_qa_file", "val_trace_file")


def now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_data_files(data) -> None:
    """Fail before building a model when a named data file is missing (``DataError``)."""
    for name in DATA_FILES:
        path = getattr(data, name)
        if path and not os.path.isfile(path):
            raise DataError(f"data file not found: data.{name}={path}")


class RunLog:
    """Rank 0's record of a run: a progress bar on a terminal (a plain line every 30 s in a log file, where tqdm's
    carriage returns would pile up), ``metrics.jsonl`` (each step once, see ``open_metrics``), TensorBoard scalars
    when installed, and one ``runs.jsonl`` line per invocation. Other ranks get a silent one."""

    def __init__(self, out_dir: str, name: str, start: int, total: int, *, active: bool) -> None:
        from tqdm.auto import tqdm

        self.out_dir, self.name, self.total, self.active = out_dir, name, total, active
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(range(start, total), desc=f"memcomp {name}", unit="step", disable=not active or not self.tty,
                        initial=start, total=total)
        self.metrics = open_metrics(out_dir, start) if active else None
        self.writer = _tensorboard(out_dir) if active else None
        self.invocation = {"started": now(), "resumed_from": start, "threads": torch.get_num_threads()}
        self._last_line = time.perf_counter()

    def log(self, rec: dict[str, Any], line: str, scalars: dict[str, float]) -> None:
        """Record one step: ``rec`` to metrics.jsonl, ``scalars`` to TensorBoard, ``line`` to the progress."""
        if not self.active:
            return
        self.bar.update(1)
        self.bar.set_postfix_str(line)
        if not self.tty and (time.perf_counter() - self._last_line >= 30 or rec["step"] == self.total):
            self._last_line = time.perf_counter()
            print(f"memcomp {self.name}: step {rec['step']}/{self.total} {line}", file=sys.stderr, flush=True)
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, rec["step"])

    def close(self, last_step: int) -> None:
        if not self.active:
            return
        self.bar.close()
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        self.invocation.update(ended=now(), last_step=last_step)
        with open(os.path.join(self.out_dir, "runs.jsonl"), "a") as f:
            f.write(json.dumps(self.invocation) + "\n")


def _tensorboard(out_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def _step_rows(model, engine, rows, tasks: list[str], global_targets: float, n_backward: int):
    """Forward + backward over this rank's rows, the loss normalised by the global target count; returns
    the sum of this rank's token losses and per-task (sum, count). Under DeepSpeed every rank runs
    ``n_backward`` micro-steps (ZeRO-3's collectives need the same count everywhere): a rank with fewer rows
    repeats its last one at weight 0."""
    total, per_task = 0.0, {}
    # DeepSpeed averages gradients over the data-parallel ranks (its reduce-scatter divides by the world
    # size): scaled by it here, each rank's share of the global token sum comes out as the token mean.
    scale = rank_world()[1] if engine is not None else 1
    for i in range(n_backward):
        row, weight = (rows[i], 1.0) if i < len(rows) else (rows[-1], 0.0)
        out = model(row)
        loss = out.token_losses.sum() * (weight * scale / global_targets)
        if engine is not None:
            engine.set_gradient_accumulation_boundary(i == n_backward - 1)
            engine.backward(loss)
        else:
            loss.backward()
        if weight:
            losses = out.token_losses.detach().float().cpu()
            total += float(losses.sum())
            sample = torch.searchsorted(row.dec_cu_seqlens[1:].cpu(), row.target_rows.cpu(), right=True)
            for j, value in zip(sample.tolist(), losses.tolist()):
                t = tasks[row.sample_index[j]]
                s, c = per_task.get(t, (0.0, 0))
                per_task[t] = (s + value, c + 1)
    return total, per_task


@torch.no_grad()
def evaluate(comp, collator, samples) -> float:
    """Mean held-out loss per target token."""
    was = comp.training
    comp.eval()
    total, n = 0.0, 0
    for row in collator(samples):
        out = comp(row)
        total += float(out.token_losses.sum())
        n += out.num_target_tokens
    comp.train(was)
    return total / max(1, n)


def optimizer_step(engine, comp, opt, sched, max_grad_norm: float) -> float:
    """Clip, step, schedule, zero the gradients; returns the gradient norm before clipping."""
    with nvtx_range("optimizer"):
        if engine is not None:
            engine.step()
            return float(engine.get_global_grad_norm())  # before clipping, as below
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in comp.parameters() if p.requires_grad],
                                                         max_grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return grad_norm


def start_process(threads: int) -> str:
    """What every trainer sets up first: torch's threads (``memcomp.runtime``; returns the header fragment),
    DeepSpeed's accelerator named on a machine without CUDA (accelerate imports DeepSpeed on every save, which
    otherwise warns that it guessed), and, when stderr is not a terminal, transformers' progress bars off (loading
    and saving shards; they would fill a log file with carriage returns)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return set_threads(threads)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a CPT / SFT run; returns a summary with the loss curve and the trained compressor."""
    threads = start_process(cfg.run.threads)
    cfg = prepare(cfg)
    check_data_files(cfg.data)
    run, optim = cfg.run, cfg.optim
    random.seed(run.seed)
    torch.manual_seed(run.seed)
    comp = build_compressor(cfg.compressor, cfg.fqlora, device=run.device, dtype=run.dtype, seed=run.seed)
    n_params = sum(p.numel() for p in comp.parameters())  # counted before ZeRO-3 partitions them to shape [0]
    comp.train()
    stream = build_stream(cfg.data, comp, stage=cfg.stage, seed=run.seed)
    collator = PackingCollator.from_compressor(comp, optim.max_tokens)
    opt, sched = build_optimizer(optim, comp)
    # Parameters the compressor reads outside their own module's forward (the final norm and projection in
    # the fused pooling, the LM head in the fused loss): ZeRO-3 must gather them for the compressor's forward.
    external = (comp.base.norm.weight, comp.model.get_output_embeddings().weight, *comp.projection.parameters())
    engine = (setup_deepspeed(comp, opt, sched, zero_stage=run.zero_stage, max_grad_norm=optim.max_grad_norm,
                              dtype=run.dtype, activation_checkpointing=cfg.compressor.activation_checkpointing,
                              external_params=external)[0]
              if wants_deepspeed(run.deepspeed) else None)
    model = engine if engine is not None else comp
    rank, world = rank_world()
    if optim.samples_per_step < world:
        raise ValueError(f"optim.samples_per_step={optim.samples_per_step} is smaller than the {world} ranks")
    os.makedirs(run.out_dir, exist_ok=True)
    loaded = (load_checkpoint(run.out_dir, comp, opt, sched) if engine is None
              else load_deepspeed_checkpoint(engine, run.out_dir))
    meta = loaded[0] if loaded else None
    if meta:
        stream.restore(meta["stream"])
    start = meta["step"] if meta else 0
    history: list[dict[str, Any]] = list(meta.get("history", [])) if meta else []
    trained_seconds = float((meta or {}).get("train_seconds", 0.0))
    invocation_train_s = trained_seconds  # time_limit_min counts this invocation's steps
    if rank == 0:
        print(f"memcomp {cfg.stage} | recipe {cfg.recipe} | {resolve_device(run.device)} {run.dtype} | {threads} | "
              f"{n_params / 1e6:.1f}M parameters | out {run.out_dir} | "
              + (f"resuming at step {start} of {optim.steps}" if start else f"{optim.steps} steps"), file=sys.stderr)
        if start >= optim.steps:
            print(f"memcomp {cfg.stage}: training already finished ({start} steps in {run.out_dir}); nothing to "
                  "train (a new out_dir= starts afresh)", file=sys.stderr)
    val = ([s for s in build_stream(cfg.data, comp, stage=cfg.stage, seed=run.seed, validation=True)
            .take(cfg.data.eval_samples)]
           if run.eval_every and has_validation(cfg.data, cfg.stage) else [])
    best, bad_evals = (meta or {}).get("best", math.inf), (meta or {}).get("bad_evals", 0)
    log = RunLog(run.out_dir, cfg.stage, start, optim.steps, active=rank == 0)
    stopped = out_of_time = False
    for step in range(start, optim.steps):
        if run.stop_after and step - start >= run.stop_after:
            break
        t0 = time.perf_counter()
        with nvtx_range("step"):
            mine = stream.take(optim.samples_per_step)[rank::world]
            rows = collator(mine)
            global_targets = all_reduce(sum(r.target_rows.numel() for r in rows), comp.device)
            n_backward = int(all_reduce(len(rows), comp.device, "max"))
            loss_sum, per_task = _step_rows(model, engine, rows, [s.task for s in mine], global_targets, n_backward)
            loss = all_reduce(loss_sum, comp.device) / global_targets
            n_tok = sum(r.n_tokens + r.enc_input_ids.numel() for r in rows)
            grad_norm = optimizer_step(engine, comp, opt, sched, optim.max_grad_norm)
        dt = time.perf_counter() - t0
        trained_seconds += dt
        rec = {"step": step + 1, "loss": loss, "grad_norm": grad_norm,
               "tokens_per_s": all_reduce(n_tok, comp.device) / dt,
               "lr": {g["name"]: g["lr"] for g in opt.param_groups},
               "task_loss": {t: s_ / c for t, (s_, c) in per_task.items()}}  # this rank's samples
        if val and (step + 1) % run.eval_every == 0:
            rec["val_loss"] = evaluate(comp, collator, val)
            if rec["val_loss"] < best - 1e-4:
                best, bad_evals = rec["val_loss"], 0
            else:
                bad_evals += 1
            stopped = run.patience > 0 and bad_evals >= run.patience
        history.append(rec)
        log.log(rec, f"loss {loss:.3f} {rec['tokens_per_s']:.0f} tok/s"
                + (f" val {rec['val_loss']:.3f}" if "val_loss" in rec else ""),
                {"loss/train": loss, **({"loss/val": rec["val_loss"]} if "val_loss" in rec else {})})
        if run.time_limit_min:  # every rank stops at the same step (ZeRO-3's collectives need it)
            out_of_time = all_reduce(float(trained_seconds - invocation_train_s >= 60 * run.time_limit_min),
                                     comp.device, "max") > 0
        last = (step + 1 == optim.steps or stopped or out_of_time
                or (run.stop_after and step + 1 - start >= run.stop_after))
        if last or (run.save_every and (step + 1) % run.save_every == 0):
            extra = {"stream": stream.state(), "history": history, "best": best, "bad_evals": bad_evals,
                     "train_seconds": trained_seconds}
            if engine is not None:
                save_deepspeed_checkpoint(engine, run.out_dir, step + 1, extra)
            elif rank == 0:
                save_checkpoint(run.out_dir, step + 1, comp, opt, sched, extra)
        if stopped:
            print(f"early stopping at step {step + 1}: no validation improvement in {run.patience} evaluations",
                  file=sys.stderr)
            break
        if out_of_time:
            print(f"memcomp {cfg.stage}: time limit of {run.time_limit_min:g} min reached at step {step + 1} of "
                  f"{optim.steps}; checkpoint written, rerun the same command to continue", file=sys.stderr)
            break
    export_compressor(comp, engine, os.path.join(run.out_dir, "compressor"))
    if rank == 0:
        used = [r.report() for r in stream.readers.values() if r.good or r.bad]  # a file never read: no line
        if used:
            print(" | ".join(used), file=sys.stderr)
    log.close(history[-1]["step"] if history else start)
    return {"config": dataclasses.asdict(cfg), "history": history, "compressor": comp, "stopped_early": stopped,
            "stopped_by_time_limit": out_of_time,
            "train_seconds": trained_seconds, "steps_this_run": (history[-1]["step"] if history else start) - start}


