"""DAPO (seed 002, section 3.3.3, Table 10): outcome-reward RL of the decoder on memory-conditioned rollouts.

    python -m memcomp.trainers.dapo --recipe tiny_cpu init_from=runs/demo/sft/compressor    # the demo's stage 3
    deepspeed --num_gpus 8 -m memcomp.trainers.dapo --recipe qwen2.5-7b init_from=runs/qwen2.5-7b-sft/compressor \\
        data.qa_file=rl_qa.jsonl

Memories of every context are encoded once by the SFT compressor (``compressor.init_from``) and stored
(``memcomp.rl.rollout.MemoryBank``, checked by fingerprint); the projection is frozen and no memory is re-encoded:
only the decoder learns to use them. One step: generation batches of ``rl.gen_prompts`` prompts, ``rl.group_size``
rollouts each, through the rollout engine (``rl.engine``: ``hf``, HF ``generate`` on ``inputs_embeds``, or
``vllm``, ``memcomp.serving.VLLMEngine`` on prompt embeddings), scored (rule or judge) and shaped (overlong), until
dynamic sampling has ``rl.prompts_per_step`` informative groups; then one clipped-ratio update per mini-batch of
``rl.mini_batch_prompts`` prompts against the rollout-time log-probabilities, the loss a token-mean over the whole
mini-batch across micro-batches (packed rows) and ranks.

With ``rl.engine=vllm`` rank 0 runs one vLLM engine for the whole run (built after a resume has loaded its
weights) and the other ranks take its groups (under ZeRO-3 they mirror its embedding lookup: ZeRO-3 traces module
calls on every rank); after each step's optimizer updates the decoder's new weights are pushed into it
(``VLLMEngine.update_weights``, gathered first under ZeRO-3), so every rollout samples from the current policy, as
with ``hf``. The engine refuses to generate from weights it has not been given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from typing import Any

import torch
from memcomp.trainers.build import build_compressor, build_optimizer, resolve_device
from memcomp.trainers.checkpoint import (
    export_compressor,
    load_checkpoint,
    load_deepspeed_checkpoint,
    save_checkpoint,
    save_deepspeed_checkpoint,
)
from memcomp.trainers.config import DAPOConfig
from memcomp.trainers.distributed import all_reduce, rank_world, run_cli, setup_deepspeed, wants_deepspeed
from memcomp.trainers.loop import RunLog, check_data_files, optimizer_step, start_process
from memcomp.trainers.recipes import prepare

from memcomp.packing import PackingCollator
from memcomp.rl.advantages import DynamicSampler, group_advantages
from memcomp.rl.engine import GenerationRequest, HFEngine, SamplingOptions
from memcomp.rl.loss import dapo_policy_loss, token_mean_divisor
from memcomp.rl.rollout import (
    Group,
    MemoryBank,
    MemoryPolicy,
    read_qa_records,
    response_samples,
    row_memory,
    row_targets,
    score_group,
)
from memcomp.serving import VLLMEngine, kv_cache_bytes, prompt_embeds_batch
from memcomp.tasks import SampleBuilder


class PromptCursor:
    """The QA records in a seeded random order, epoch after epoch; ``state()`` / ``restore()`` for resuming."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()


def stop_token_ids(tokenizer) -> list[int]:
    """ChatML's end marker ends a response: its id when the tokenizer has it as one token (Qwen), else the first
    token of its spelling (the demo's tiny tokenizer spells it as text, and the SFT model learned to write it)."""
    ids = tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
    return [ids[0]] if ids else []


def _judge(cfg: DAPOConfig):
    if cfg.rl.reward != "judge":
        return None
    from memcomp.rl.judge import GenerativeJudge, JudgeConfig

    return GenerativeJudge(JudgeConfig(base_url=cfg.rl.judge_url, model=cfg.rl.judge_model,
                                       cache_path=os.path.join(cfg.run.out_dir, "judge_cache.sqlite")))


def rollout_requests(records, idx: list[int], bank: MemoryBank, builder: SampleBuilder,
                     comp=None) -> tuple[list[tuple[list[int], list[int]]], list[GenerationRequest]]:
    """The (before, after) prompt ids and the engine requests of the records in ``idx``."""
    prompts = []
    for i in idx:
        r = records[i]
        before, after = builder._wrap(r.question)  # the prompt SFT trained on (with the \\boxed{} request if boxed)
        prompts.append((before, after))
    dtype = comp.dtype if comp is not None else torch.float32
    requests = [GenerationRequest(bank.get(records[i].context).embeddings.to(dtype), after, prefix=before)
                for i, (before, after) in zip(idx, prompts)]
    return prompts, requests


def rollout_batch(engine, records, idx: list[int], bank: MemoryBank, builder: SampleBuilder, cfg: DAPOConfig,
                  seed: int, stops: list[int], judge=None, comp=None) -> list[Group]:
    """Generate and score one generation batch: ``rl.group_size`` responses for each record in ``idx``."""
    rl = cfg.rl
    prompts, requests = rollout_requests(records, idx, bank, builder, comp)
    options = SamplingOptions(n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p,
                              max_new_tokens=rl.max_response_tokens, stop_token_ids=tuple(stops), seed=seed,
                              return_logprobs=True)
    results = engine.generate(requests, options)
    judged = None
    if judge is not None:
        from memcomp.rl.judge import JudgeItem

        items = [JudgeItem(records[i].question, list(records[i].answers), res.text)
                 for i, group in zip(idx, results) for res in group]
        verdicts = judge.judge_batch(items)  # JudgeError after its retries: never a silent 0 for the batch
        judged = [verdicts[k * rl.group_size:(k + 1) * rl.group_size] for k in range(len(idx))]
    groups = []
    for k, (i, group, (before, after)) in enumerate(zip(idx, results, prompts)):
        correct, shaped = score_group([g.text for g in group], [g.num_tokens for g in group], records[i].answers,
                                      boxed=rl.boxed, match=rl.match, max_response_tokens=rl.max_response_tokens,
                                      overlong_buffer=rl.overlong_buffer, overlong_factor=rl.overlong_factor,
                                      judged=None if judged is None else judged[k])
        mem = bank.get(records[i].context)
        groups.append(Group(i, records[i].context, before, after, mem.num_tokens, [g.token_ids for g in group],
                            [g.logprobs.float() for g in group], correct, shaped))
    return groups


def update(policy_model, engine, comp, groups: list[Group], bank: MemoryBank, collator, cfg: DAPOConfig):
    """One clipped-ratio update over a mini-batch of groups (this rank takes every world-th response); returns
    (loss, tokens, clipped tokens) summed over ranks, and this rank's decoder tokens. Every rank runs as many
    micro-steps as the busiest (ZeRO-3's collectives): the extra ones repeat a row at weight 0."""
    rank, world = rank_world()
    adv = group_advantages([g.rewards for g in groups])  # [P, G], unbiased std
    samples = response_samples(groups, comp.tokenizer.pad_token_id)
    old = [lp for g in groups for lp in g.old_logp]
    advs = [torch.full((len(r),), float(adv[p, j])) for p, g in enumerate(groups) for j, r in enumerate(g.responses)]
    mems = [bank.get(g.context).embeddings for g in groups for _ in g.responses]
    mine = list(range(rank, len(samples), world))
    if not mine:
        raise ValueError(f"a mini-batch of {len(samples)} responses cannot feed {world} ranks")
    rows = collator([samples[i] for i in mine])
    local_tokens = sum(len(samples[i].target) for i in mine)
    divisor = token_mean_divisor(local_tokens, grad_reduction="mean" if engine is not None else "sum")
    n_backward = int(all_reduce(len(rows), comp.device, "max"))
    pick = lambda values: [values[i] for i in mine]  # noqa: E731 - per-row lookups below index this rank's list
    old_m, adv_m, mem_m = pick(old), pick(advs), pick(mems)
    loss_sum = clipped = 0.0
    for i in range(n_backward):
        row, weight = (rows[i], 1.0) if i < len(rows) else (rows[-1], 0.0)
        logp = policy_model(row, row_memory(row, samples, mem_m))
        out = dapo_policy_loss(logp, row_targets(row, old_m).to(logp.device), row_targets(row, adv_m).to(logp.device),
                               eps_low=cfg.rl.eps_low, eps_high=cfg.rl.eps_high)
        loss = out.loss_sum * (weight / divisor)
        if engine is not None:
            engine.set_gradient_accumulation_boundary(i == n_backward - 1)
            engine.backward(loss)
        else:
            loss.backward()
        if weight:
            loss_sum += float(out.loss_sum.detach())
            clipped += float(out.clipped_low + out.clipped_high)
    total = all_reduce(local_tokens, comp.device)
    return (all_reduce(loss_sum, comp.device) / total, total, all_reduce(clipped, comp.device),
            sum(r.n_tokens for r in rows))


def train(cfg: DAPOConfig) -> dict[str, Any]:
    """Run (or resume) DAPO; returns a summary with the per-step history and the trained compressor."""
    if cfg.rl.engine == "vllm":  # before any work: a run that would fail at its first rollout fails now
        from memcomp.serving.engine import INSTALL_HINT, vllm_available

        if not vllm_available():
            raise ImportError(f"rl.engine=vllm: {INSTALL_HINT}")
    threads = start_process(cfg.run.threads)
    cfg = prepare(cfg)
    if not cfg.compressor.init_from:
        raise ValueError("DAPO continues from a SFT compressor: set compressor.init_from=")
    if not cfg.data.qa_file:
        raise ValueError("DAPO needs QA records: set data.qa_file=")
    check_data_files(cfg.data)
    run, optim, rl = cfg.run, cfg.optim, cfg.rl
    records = read_qa_records(cfg.data.qa_file, rl.match)
    torch.manual_seed(run.seed)
    comp = build_compressor(cfg.compressor, cfg.fqlora, device=run.device, dtype=run.dtype, seed=run.seed)
    # The memories are the SFT encoder's, encoded before any update: the fingerprint of init_from.
    fingerprint = comp.fingerprint()
    memory_dir = rl.memory_dir or os.path.join(run.out_dir, "memories")
    comp.eval()
    bank = MemoryBank.build(comp, [r.context for r in records], memory_dir, doc_tokens=cfg.data.doc_tokens)
    if bank.fingerprint != fingerprint:  # pragma: no cover - build checks it; kept for a bank shared across runs
        raise RuntimeError("memory bank fingerprint changed while building")
    comp.projection.requires_grad_(False)  # the memories' projection stays SFT's (Table 10: decoder only)
    comp.train()
    policy = MemoryPolicy(comp)
    updates = rl.prompts_per_step // rl.mini_batch_prompts
    opt, sched = build_optimizer(dataclasses.replace(optim, steps=optim.steps * updates), comp)
    # Before DeepSpeed: the collator reads the vocabulary size off the embedding, which ZeRO-3 partitions to
    # shape [0] (every id then looked out of range).
    collator = PackingCollator.from_compressor(comp, optim.max_tokens)
    engine = None
    if wants_deepspeed(run.deepspeed):
        engine = setup_deepspeed(policy, opt, sched, zero_stage=run.zero_stage, max_grad_norm=optim.max_grad_norm,
                                 dtype=run.dtype, activation_checkpointing=cfg.compressor.activation_checkpointing,
                                 external_params=(comp.model.get_output_embeddings().weight,))[0]
    policy_model = engine if engine is not None else policy
    rank, world = rank_world()
    builder = SampleBuilder(comp.tokenizer, cfg.data.prompt_format, boxed=rl.boxed, chunk_size=comp.config.chunk_size)
    stops = stop_token_ids(comp.tokenizer)
    judge = _judge(cfg)
    sampler: DynamicSampler[Group] = DynamicSampler(rl.prompts_per_step, rl.max_gen_batches, rl.dynamic_warmup_steps)
    cursor = PromptCursor(len(records), run.seed)
    os.makedirs(run.out_dir, exist_ok=True)
    loaded = (load_checkpoint(run.out_dir, policy, opt, sched) if engine is None
              else load_deepspeed_checkpoint(engine, run.out_dir))
    meta, state = loaded if loaded else ({}, {})
    if loaded:
        cursor.restore(meta["cursor"])
        sampler.load_state_dict(state["sampler"])
    # After the resume: vLLM loads the weights the run continues from (gathered under ZeRO-3).
    rollout_engine = _rollout_engine(cfg, comp, engine, records, bank, builder)
    try:
        start = int(meta.get("step", 0))
        gen_calls = int(meta.get("gen_calls", 0))
        history: list[dict[str, Any]] = list(meta.get("history", []))
        trained_seconds = float(meta.get("train_seconds", 0.0))
        if rank == 0:
            print(f"memcomp dapo | recipe {cfg.recipe} | {resolve_device(run.device)} {run.dtype} | {threads} | "
                  f"{len(records)} QA records, memories {memory_dir} ({fingerprint}) | out {run.out_dir} | "
                  + (f"resuming at step {start} of {optim.steps}" if start else f"{optim.steps} steps"),
                  file=sys.stderr)
        log = RunLog(run.out_dir, "dapo", start, optim.steps, active=rank == 0)
        gen_prompts = rl.gen_prompts or rl.prompts_per_step
        for step in range(start, optim.steps):
            if run.stop_after and step - start >= run.stop_after:
                break
            t0 = time.perf_counter()
            rewards, correct, lengths = [], [], []
            stats = sampler.stats()
            while (batch := sampler.next_batch()) is None:
                idx = cursor.take(gen_prompts)
                # HF: every rank generates the same batch with the same seed; vLLM: rank 0 alone (the others hold
                # no engine). Rank 0's groups are used everywhere, so the dynamic sampler is identical on all
                # ranks; under ZeRO-3 the weights are gathered for it (no collective inside generate, whose step
                # count differs with the responses; the vLLM engine reads the embedding table and fingerprint).
                with _gathered(engine, comp):
                    if rollout_engine is None:  # vLLM on rank 0: mirror its embedding lookup (see the function)
                        prompt_embeds_batch(comp, rollout_requests(records, idx, bank, builder, comp)[1])
                        groups = None
                    else:
                        groups = rollout_batch(rollout_engine, records, idx, bank, builder, cfg,
                                               seed=run.seed * 1_000_003 + gen_calls, stops=stops, judge=judge,
                                               comp=comp)
                groups = _from_rank0(groups)
                gen_calls += 1
                for g in groups:
                    rewards += g.rewards
                    correct += g.correct
                    lengths += [len(r) for r in g.responses]
                sampler.add(groups, [g.correct for g in groups])
                stats = sampler.stats()  # before next_batch, which starts the next step's counts
            if not correct:  # the whole batch came from groups kept over from earlier steps
                for g in batch:
                    rewards, correct = rewards + g.rewards, correct + g.correct
                    lengths += [len(r) for r in g.responses]
            t_roll = time.perf_counter() - t0
            losses, grad_norms, tokens, clipped, dec_tokens = [], [], 0, 0.0, 0
            for u in range(updates):
                mb = batch[u * rl.mini_batch_prompts:(u + 1) * rl.mini_batch_prompts]
                loss, n_tok, n_clip, n_dec = update(policy_model, engine, comp, mb, bank, collator, cfg)
                grad_norms.append(optimizer_step(engine, policy, opt, sched, optim.max_grad_norm))
                losses.append(loss)
                tokens += n_tok
                clipped += n_clip
                dec_tokens += n_dec
            # Rollouts come only between steps, so one push after the step's last optimizer update keeps every
            # rollout on the current policy (one checkpoint write per step, not one per mini-batch).
            _sync_rollout_engine(rollout_engine, engine, comp)
            dt = time.perf_counter() - t0
            trained_seconds += dt
            rec = {"step": step + 1, "loss": sum(losses) / len(losses), "losses": losses, "grad_norm": grad_norms,
                   "reward_mean": sum(rewards) / len(rewards), "accuracy": sum(correct) / len(correct),
                   "kept_fraction": stats["kept_fraction"], "gen_batches": stats["gen_batches"],
                   "response_length": sum(lengths) / len(lengths), "clip_fraction": clipped / max(1, tokens),
                   "rollout_seconds": t_roll, "update_seconds": dt - t_roll,
                   "tokens_per_s": (sum(lengths) + all_reduce(dec_tokens, comp.device)) / dt,
                   "lr": {g["name"]: g["lr"] for g in opt.param_groups}}
            history.append(rec)
            log.log(rec, f"reward {rec['reward_mean']:.3f} acc {rec['accuracy']:.3f} kept {rec['kept_fraction']:.2f} "
                    f"len {rec['response_length']:.1f} clip {rec['clip_fraction']:.3f}",
                    {f"rl/{k}": rec[k] for k in ("loss", "reward_mean", "accuracy", "kept_fraction", "response_length",
                                                 "clip_fraction", "tokens_per_s")})
            last = step + 1 == optim.steps or (run.stop_after and step + 1 - start >= run.stop_after)
            if last or (run.save_every and (step + 1) % run.save_every == 0):
                meta_out = {"cursor": cursor.state(), "gen_calls": gen_calls, "history": history,
                            "train_seconds": trained_seconds, "memory_fingerprint": fingerprint}
                state_out = {"sampler": sampler.state_dict()}
                if engine is not None:
                    save_deepspeed_checkpoint(engine, run.out_dir, step + 1, meta_out, state_out)
                elif rank == 0:
                    save_checkpoint(run.out_dir, step + 1, policy, opt, sched, meta_out, state_out)
        if judge is not None:
            judge.close()
        export_compressor(comp, engine, os.path.join(run.out_dir, "compressor"))
        log.close(history[-1]["step"] if history else start)
        if rank == 0:
            with open(os.path.join(run.out_dir, "memory_bank.json"), "w") as f:
                json.dump({"directory": memory_dir, "fingerprint": fingerprint}, f)
        return {"config": dataclasses.asdict(cfg), "history": history, "compressor": comp, "bank": bank,
                "train_seconds": trained_seconds, "steps_this_run": (history[-1]["step"] if history else start) - start}

    finally:
        if isinstance(rollout_engine, VLLMEngine):
            rollout_engine.close()  # vLLM's engine processes and its checkpoint folder, on every exit

def _rollout_engine(cfg: DAPOConfig, comp, engine, records, bank: MemoryBank, builder: SampleBuilder):
    """The rollout engine of ``rl.engine``: an ``HFEngine`` on every rank, or a ``VLLMEngine`` on rank 0 (None on
    the others) loaded with the compressor's current decoder weights.

    vLLM's limits come from the run: ``max_model_len`` is the longest rollout (the longest prompt of the QA
    records, memory block included, plus ``rl.max_response_tokens``); its KV cache holds that many positions for
    each sequence it runs at once, ``rl.engine_batch`` sequences (0: a whole generation batch, ``rl.gen_prompts``
    x ``rl.group_size``); more sequences queue inside vLLM. On a GPU the engine shares the device with training:
    its memory check is set to the memory free when it starts."""
    rl = cfg.rl
    if rl.engine == "hf":
        return HFEngine(comp, max_batch_size=rl.engine_batch or None)
    # Under ZeRO-3 every rank enters the gather (a collective) and rank 0 alone builds the engine, which writes the
    # full weights to its checkpoint. (Rank 0 alone in the gather hung a two-rank run at its next collective.)
    with _gathered(engine, comp):
        if rank_world()[0] != 0:
            return None
        longest = 0
        for r in records:
            before, after = builder._wrap(r.question)  # what rollout_batch sends
            block, _ = comp.memory_layout(bank.get(r.context).embeddings.shape[0])
            longest = max(longest, len(before) + len(block) + len(after))
        max_model_len = longest + rl.max_response_tokens
        seqs = rl.engine_batch or (rl.gen_prompts or rl.prompts_per_step) * rl.group_size
        kwargs: dict[str, Any] = {}
        if comp.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(comp.device)
            kwargs["gpu_memory_utilization"] = 0.9 * free / total  # vLLM refuses to start above what is free
        else:
            kwargs["enforce_eager"] = True  # no torch.compile of the decoder on a CPU, as the serving tests run it
        return VLLMEngine(comp, max_model_len=max_model_len, max_num_seqs=seqs, seed=cfg.run.seed,
                          kv_cache_memory_bytes=kv_cache_bytes(comp, seqs, max_model_len), **kwargs)


def _sync_rollout_engine(rollout_engine, engine, comp) -> None:
    """Push the decoder's current weights (FQLoRA merged) into a vLLM rollout engine; nothing for ``HFEngine``,
    which generates with the model itself. Under ZeRO-3 every rank gathers the weights (a collective) and rank 0,
    which holds the engine, sends them."""
    if isinstance(rollout_engine, HFEngine):
        return
    with _gathered(engine, comp):
        if rollout_engine is not None:
            rollout_engine.update_weights()


def _gathered(engine, comp):
    import contextlib

    if engine is None or getattr(engine, "zero_optimization_stage", lambda: 0)() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(comp.parameters()), modifier_rank=None)


def _from_rank0(groups: list[Group]) -> list[Group]:
    if rank_world()[1] == 1:
        return groups
    box = [groups]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def main(argv=None) -> int:
    return run_cli("python -m memcomp.trainers.dapo", ("dapo",), argv, train)


if __name__ == "__main__":
    sys.exit(main())
