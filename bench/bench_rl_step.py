"""One DAPO step of the qwen2.5-7b dapo recipe (seed 002 Table 10), random weights, one GPU: the rollout and the
update timed apart, as tokens/s and seconds, then scaled to the recipe's whole step on one of its 8 ranks.

What one rank of ``deepspeed --num_gpus 8 -m memcomp.trainers.dapo --recipe qwen2.5-7b`` does per step:

- rollout: ``prompts_per_step`` (128) prompts x ``group_size`` (16) responses through the HF engine, in engine
  batches of ``engine_batch`` (256) rows. The trainer generates the whole batch on every rank (rank 0's groups are
  broadcast: ``memcomp.trainers.dapo``), so a rank runs 2,048 / 256 = 8 engine batches per generation batch.
  Timed here: one engine batch (16 prompts x 16) to the full 600 tokens -- random weights never emit the stop
  token, so this is the longest a batch can take (the overlong case).
- update: ``prompts_per_step / mini_batch_prompts`` (2) clipped-ratio updates, each on this rank's share of a
  64-prompt mini-batch (64 x 16 / 8 = 128 responses), packed into rows of ``optim.max_tokens`` (4,096), forward
  (``MemoryPolicy``: decoder on precomputed memories + target-only fused loss) + backward + AdamW step over the
  FQLoRA parameters. Timed here: one such update (``memcomp.trainers.dapo.update`` + ``optimizer_step``) on one
  GPU, without ZeRO-3's collectives.

The prompt: a ``CONTEXT``-token context at 16x (its memory embeddings, 3 decoder positions each with the
per-embedding wrapper) inside the RL ChatML prompt. ``step_s_per_rank`` = 8 x rollout + 2 x update, an estimate
from the two timed pieces (the generation batches dynamic sampling adds are extra). On a CPU: the tiny config,
2 prompts x 4 responses of 8 tokens, as a smoke run of the same code (Triton in its interpreter).
"""

import dataclasses
import random

import pytest
import torch
from benchutil import DEVICE, HAS_CUDA, per_s
from memcomp.trainers.build import build_optimizer
from memcomp.trainers.dapo import update
from memcomp.trainers.loop import optimizer_step
from memcomp.trainers.recipes import recipe

from memcomp import CompressorConfig, MemoryCompressor
from memcomp.fqlora import FQLoRAConfig, apply_fqlora
from memcomp.model_configs import IdTokenizer, random_model
from memcomp.packing import PackingCollator
from memcomp.rl.engine import GenerationRequest, HFEngine, SamplingOptions
from memcomp.rl.rollout import Group, MemoryPolicy, response_samples

COLUMNS = ["phase", "rows", "tokens", "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "per_step", "step_s_per_rank",
           "peak_MB"]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
CFG = recipe("qwen2.5-7b", "dapo")
RANKS = 8  # the recipe's deepspeed --num_gpus 8
if HAS_CUDA:
    MODEL, CONTEXT, PROMPT = "qwen2.5-7b", 4096, 48
    GEN_PROMPTS, G, MAX_NEW = CFG.rl.engine_batch // CFG.rl.group_size, CFG.rl.group_size, CFG.rl.max_response_tokens
    UPDATE_PROMPTS = CFG.rl.mini_batch_prompts // RANKS  # this rank's share of one mini-batch: 8 prompts x 16
    MAX_TOKENS = CFG.optim.max_tokens
    WARMUP, RUNS = 1, 2  # one 7B engine batch of 600 tokens is ~10-30 s: few runs
else:
    MODEL, CONTEXT, PROMPT = "tiny", 64, 8
    GEN_PROMPTS, G, MAX_NEW, UPDATE_PROMPTS, MAX_TOKENS = 2, 4, 8, 2, 256
    WARMUP, RUNS = 1, 2
# Engine batches and updates per step on one rank (the trainer generates the whole batch on every rank).
ROLLOUTS_PER_STEP = CFG.rl.prompts_per_step * CFG.rl.group_size // (GEN_PROMPTS * G)
UPDATES_PER_STEP = CFG.rl.prompts_per_step // CFG.rl.mini_batch_prompts


@pytest.fixture(scope="module")
def compressor():
    model = random_model(MODEL, device=DEVICE, dtype=DTYPE)
    comp = MemoryCompressor.from_base(model, _Tokenizer(model.config.vocab_size), CompressorConfig(chunk_size=16))
    apply_fqlora(comp, FQLoRAConfig(rank=CFG.fqlora.rank, alpha=CFG.fqlora.alpha, dropout=CFG.fqlora.dropout))
    comp.projection.requires_grad_(False)  # as the trainer: DAPO trains the decoder only
    if HAS_CUDA:
        comp.enable_activation_checkpointing()  # the recipe's compressor.activation_checkpointing
    return comp


def _prompt(rng, vocab):
    return [rng.randrange(1, vocab) for _ in range(PROMPT)]


def _memory(comp, rng):
    n = -(-CONTEXT // comp.config.chunk_size)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return (torch.randn(n, comp.hidden_size, generator=g) * 0.02).to(device=comp.device, dtype=comp.dtype)


def test_rl_rollout(bench, compressor):
    """One engine batch: GEN_PROMPTS prompts x G sampled responses of MAX_NEW tokens, with log-probabilities."""
    comp = compressor.eval()
    rng = random.Random(0)
    V = comp.model.config.vocab_size - 2
    requests = [GenerationRequest(_memory(comp, rng), _prompt(rng, V)) for _ in range(GEN_PROMPTS)]
    # No stop ids: every response runs to MAX_NEW (the longest batch; random weights would rarely stop anyway).
    options = SamplingOptions(n=G, temperature=CFG.rl.temperature, top_p=CFG.rl.top_p, max_new_tokens=MAX_NEW,
                              seed=0, return_logprobs=True)
    engine = HFEngine(comp, max_batch_size=GEN_PROMPTS * G)
    produced = []

    def make():
        def run():
            out = engine.generate(requests, options)
            produced[:] = [sum(r.num_tokens for g in out for r in g)]
            return out
        return run

    r = bench.compare({"hf_generate": make}, warmup=WARMUP, runs=RUNS, peak=True)["hf_generate"]
    assert produced and produced[0] > 0
    rows = GEN_PROMPTS * G
    bench.add({"phase": "rollout", "rows": rows, "tokens": produced[0], **r, "tokens_per_s": per_s(produced[0], r),
               "per_step": ROLLOUTS_PER_STEP, "step_s_per_rank": None})
    _ROLLOUT_S[:] = [r.get("median_ms", float("nan")) * 1e-3]


_ROLLOUT_S: list[float] = []


def test_rl_update(bench, compressor):
    """One clipped-ratio update on this rank's share of a mini-batch: packed forward + backward of
    UPDATE_PROMPTS x G responses of MAX_NEW tokens, then the AdamW step."""
    comp = compressor.train()
    rng = random.Random(1)
    V = comp.model.config.vocab_size - 2
    memories = [_memory(comp, rng) for _ in range(UPDATE_PROMPTS)]
    groups = []
    for p in range(UPDATE_PROMPTS):
        responses = [[rng.randrange(1, V) for _ in range(MAX_NEW)] for _ in range(G)]
        rewards = [float(j % 2) for j in range(G)]  # mixed rewards: non-zero advantages, as dynamic sampling keeps
        groups.append(Group(p, f"context {p}", [], _prompt(rng, V), CONTEXT, responses, [], rewards, rewards))
    bank = _Bank({g.context: m for g, m in zip(groups, memories)})
    collator = PackingCollator.from_compressor(comp, MAX_TOKENS)
    policy = MemoryPolicy(comp)
    # Rollout-time log-probabilities: the policy's own (ratio 1 at the first update, as on-policy DAPO starts).
    samples = response_samples(groups, 0)
    with torch.no_grad():
        for row in collator(samples):
            mem = torch.cat([memories[i // G] for i in row.sample_index])
            logp = policy(row, mem).cpu()
            offsets = [0]
            for i in row.sample_index:
                offsets.append(offsets[-1] + len(samples[i].target))
            for k, i in enumerate(row.sample_index):
                groups[i // G].old_logp.append((i % G, logp[offsets[k]:offsets[k + 1]]))
    for g in groups:
        g.old_logp = [lp for _, lp in sorted(g.old_logp, key=lambda t: t[0])]
    opt, sched = build_optimizer(dataclasses.replace(CFG.optim, steps=CFG.optim.steps * UPDATES_PER_STEP), comp)
    n_rows, tokens = len(collator(samples)), sum(len(s.target) for s in samples)
    decoder_tokens = []

    def make():
        def run():
            _, _, _, n_dec = update(policy, None, comp, groups, bank, collator, CFG)
            decoder_tokens[:] = [n_dec]
            return optimizer_step(None, policy, opt, sched, CFG.optim.max_grad_norm)
        return run

    r = bench.compare({"update": make}, warmup=WARMUP, runs=RUNS, peak=True)["update"]
    step_s = None
    if _ROLLOUT_S and "median_ms" in r:
        step_s = ROLLOUTS_PER_STEP * _ROLLOUT_S[0] + UPDATES_PER_STEP * r["median_ms"] * 1e-3
    # tokens/s over every decoder position the forward and backward ran (prompt, memory slots and responses).
    bench.add({"phase": "update", "rows": n_rows, "tokens": tokens, **r,
               "tokens_per_s": per_s(decoder_tokens[0], r) if decoder_tokens else None,
               "per_step": UPDATES_PER_STEP, "step_s_per_rank": step_s})
    assert decoder_tokens and decoder_tokens[0] > tokens


class _Tokenizer(IdTokenizer):
    """``IdTokenizer`` plus the ``decode`` the engine calls on each response (ids as text: random weights have no
    vocabulary; a real tokenizer's decode is a small part of a 600-token rollout either way)."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


class _Bank:
    """The ``MemoryBank`` interface ``update`` reads (``get(context).embeddings``), over in-memory tensors."""

    def __init__(self, memories):
        self._m = memories

    def get(self, context):
        return _Memory(self._m[context])


@dataclasses.dataclass
class _Memory:
    embeddings: torch.Tensor
