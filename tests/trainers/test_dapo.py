"""The DAPO trainer: the update's token-mean over packed micro-batches against a hand-computed reference,
overlong values, dynamic sampling's cap, kill-and-resume, and bad input."""

import json
import os
import shutil

import pytest
import torch
from memcomp.trainers import dapo
from memcomp.trainers.config import apply_overrides
from memcomp.trainers.cpt import main as cpt_main
from memcomp.trainers.recipes import recipe

from memcomp import MemoryCompressor
from memcomp.memory import MemoryMismatchError
from memcomp.packing import PackingCollator
from memcomp.rl.advantages import DynamicSamplingError, group_advantages
from memcomp.rl.rollout import Group, MemoryBank, MemoryPolicy, read_qa_records, score_group

TINY = ["compressor.tiny_hidden=64", "compressor.tiny_layers=2", "compressor.tiny_vocab=512", "data.doc_tokens=16"]
RL = ["optim.steps=3", "rl.group_size=4", "rl.prompts_per_step=4", "rl.mini_batch_prompts=2", "rl.gen_prompts=2",
      "rl.max_response_tokens=6", "rl.overlong_buffer=2", "data.doc_tokens=16", "run.save_every=0"]


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory):
    """A tiny compressor (two CPT steps) and the demo data: what DAPO continues from in these tests."""
    root = tmp_path_factory.mktemp("dapo")
    assert cpt_main(["--recipe", "tiny_cpu", f"run.out_dir={json.dumps(str(root / 'cpt'))}", "optim.steps=2",
                     "optim.samples_per_step=4", "run.save_every=0", "run.eval_every=0", *TINY]) == 0
    return root


def _run(sft_root, tmp_path, name, *extra):
    d = tmp_path / name
    d.mkdir()
    shutil.copytree(sft_root / "data", d / "data")
    out = d / "rl"
    dapo.main(["--recipe", "tiny_cpu", f"run.out_dir={json.dumps(str(out))}",
               f"compressor.init_from={json.dumps(str(sft_root / 'cpt' / 'compressor'))}", *RL, *extra])
    return [json.loads(line) for line in open(out / "metrics.jsonl")], out


def test_overlong_shaping_values_and_a_response_past_the_maximum():
    correct, shaped = score_group([" x", " y", " x"], [500, 550, 600], ["x"], boxed=False, match="exact",
                                  max_response_tokens=600, overlong_buffer=100, overlong_factor=0.5)
    assert correct == [1.0, 0.0, 1.0] and shaped == pytest.approx([1.0, -0.25, 0.5])
    with pytest.raises(ValueError, match="601 tokens is longer than rl.max_response_tokens=600"):
        score_group(["x"], [601], ["x"], boxed=False, match="exact", max_response_tokens=600, overlong_buffer=100,
                    overlong_factor=0.5)


def test_update_is_the_token_mean_over_all_micro_batches(sft_root):
    """Three prompts x two responses packed into several rows (micro-batches): the gradient equals the
    hand-computed DAPO objective -- per-token clipped surrogate, summed over every response token, divided by
    their total count -- computed from an unpacked forward with log_softmax."""
    cfg = apply_overrides(recipe("tiny_cpu", "dapo"), [*RL, "optim.max_tokens=40", "rl.mini_batch_prompts=2"])
    comp = MemoryCompressor.from_pretrained(sft_root / "cpt" / "compressor")
    comp.projection.requires_grad_(False)  # as the trainer does: the memories' projection stays SFT's
    comp.train()
    torch.manual_seed(0)
    ctx = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22, 23, 24, 25]]
    mem = [torch.randn(-(-len(c) // 4), comp.hidden_size) for c in ctx]
    bank = _Bank(mem)
    responses = [[[30, 31, 32], [33, 34]], [[35], [36, 37, 38, 39]], [[40, 41], [42, 43, 44]]]
    rewards = [[1.0, 0.0], [0.0, 1.0], [1.0, -0.5]]
    # Rollout-time log-probabilities shifted by +-0.6 from the current ones, so both clip sides are active.
    with torch.no_grad():
        cur = [[_ref_logp(comp, mem[p], [1, 2], [3], r) for r in responses[p]] for p in range(3)]
    old = [[c - 0.6 * (-1) ** k for k, c in enumerate(cs)] for cs in cur]
    groups = [Group(p, str(p), [1, 2], [3], len(ctx[p]), responses[p], old[p], [0.0, 1.0], rewards[p])
              for p in range(3)]
    collator = PackingCollator.from_compressor(comp, cfg.optim.max_tokens)
    policy = MemoryPolicy(comp)
    rows = collator(dapo.response_samples(groups, comp.tokenizer.pad_token_id))
    assert len(rows) >= 2  # really several micro-batches
    loss, tokens, clipped, _ = dapo.update(policy, None, comp, groups, bank, collator, cfg)
    grads = [p.grad.clone() for p in comp.parameters() if p.requires_grad]
    comp.zero_grad(set_to_none=True)
    # The reference, by hand.
    adv = group_advantages(rewards)
    total, n = 0.0, 0
    n_clip = 0
    for p in range(3):
        for j, r in enumerate(responses[p]):
            logp = _ref_logp(comp, mem[p], [1, 2], [3], r, grad=True)
            ratio = torch.exp(logp - old[p][j])
            a = float(adv[p, j])
            total = total + torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28)).sum()
            n += len(r)
            n_clip += int(((ratio < 0.8) & (a < 0)).sum() + ((ratio > 1.28) & (a > 0)).sum())
    (total / n).backward()
    ref = [p.grad for p in comp.parameters() if p.requires_grad]
    assert tokens == n and clipped == n_clip and 0 < n_clip < n
    assert loss == pytest.approx(float(total.detach()) / n, rel=1e-5)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


class _Bank:
    """Memories by context name ("0", "1", ...), as ``MemoryBank.get`` returns them."""

    def __init__(self, embeddings):
        self.embeddings = embeddings

    def get(self, context):
        return type("Memory", (), {"embeddings": self.embeddings[int(context)]})


def _ref_logp(comp, memory, before, after, response, grad=False):
    """log p of each response token from an unpacked, padded forward (build_decoder_inputs + log_softmax)."""
    batch = comp.build_decoder_inputs([memory], [after], [response], padding_side="right", append_eos=False,
                                      prefixes=[before])
    with torch.set_grad_enabled(grad):
        logits = comp.model(**batch.model_kwargs(), use_cache=False).logits[0, :-1].float()
        labels = batch.labels[0, 1:]
        sel = labels != -100
        return torch.log_softmax(logits[sel], -1).gather(1, labels[sel][:, None])[:, 0]


def test_kill_and_resume_reproduces_the_uninterrupted_run(sft_root, tmp_path):
    """Generation batches of 3 prompts for train batches of 4: kept groups carry over from step to step in the
    dynamic sampler's buffer. The buffer, the data position, the generation seeds and the optimizer all come
    back on resume."""
    extra = ("rl.dynamic_warmup_steps=3", "rl.gen_prompts=3")
    full, _ = _run(sft_root, tmp_path, "full", *extra)
    first, out = _run(sft_root, tmp_path, "resumed", *extra, "run.stop_after=1")
    assert len(first) == 1 and (out / "latest").read_text() == "ckpt-0000001"
    state = torch.load(out / "ckpt-0000001" / "state.pt", weights_only=False)["trainer_state"]
    assert len(state["sampler"]["buffer"]) == 2  # 6 generated, 4 trained on, 2 carried over
    resumed = _resume(sft_root, out, extra)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    flat = lambda rs, k: [v for r in rs for v in r[k]]  # noqa: E731
    for key in ("losses", "grad_norm"):  # each of the two updates per step
        assert flat(resumed, key) == pytest.approx(flat(full, key), rel=1e-6, abs=1e-7), key
    assert any(flat(full, "losses"))
    for key in ("reward_mean", "accuracy", "kept_fraction", "response_length", "clip_fraction"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in full], rel=1e-6, abs=1e-7), key


def _resume(sft_root, out, extra):
    dapo.main(["--recipe", "tiny_cpu", f"run.out_dir={json.dumps(str(out))}",
               f"compressor.init_from={json.dumps(str(sft_root / 'cpt' / 'compressor'))}", *RL, *extra])
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_every_group_filtered_out_until_the_cap_is_a_clear_error(sft_root, tmp_path):
    # The untrained policy answers nothing right: after the warm-up every group is all-zero and is dropped.
    with pytest.raises(DynamicSamplingError, match=r"max_gen_batches=2\) kept 0 of 4 groups"):
        _run(sft_root, tmp_path, "cap", "rl.dynamic_warmup_steps=0", "rl.max_gen_batches=2")


def test_bad_input(sft_root, tmp_path):
    bad = tmp_path / "qa.jsonl"
    bad.write_text(json.dumps({"context": "a b c", "question": "Q?", "answers": ["b"]}) + "\n"
                   + json.dumps({"context": "d e f", "question": "Q?", "answers": []}) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:2: a QA record without gold answers"):
        read_qa_records(str(bad))
    with pytest.raises(ValueError, match=r"qa.jsonl:2: a QA record without gold answers"):
        _run(sft_root, tmp_path, "noanswers", f"data.qa_file={json.dumps(str(bad))}")
    # Memories encoded by another compressor: the bank refuses them, never decodes them.
    comp = MemoryCompressor.from_pretrained(sft_root / "cpt" / "compressor")
    bank_dir = tmp_path / "bank"
    MemoryBank.build(comp, ["one two three four five"], str(bank_dir), doc_tokens=16)
    with torch.no_grad():
        comp.projection.weight.add_(1e-3)  # another compressor: different encoder weights
    with pytest.raises(MemoryMismatchError, match="another compressor"):
        MemoryBank.build(comp, ["one two three four five"], str(bank_dir), doc_tokens=16)
    with pytest.raises(MemoryMismatchError, match="a memory from another compressor"):
        MemoryBank.load(str(bank_dir), comp.fingerprint())
    with pytest.raises(ValueError, match="rl.judge_url"):
        apply_overrides(recipe("tiny_cpu", "dapo"), ["rl.reward=judge", "rl.match=sub_em", "rl.boxed=true"])
    with pytest.raises(ValueError, match="positive multiple"):
        apply_overrides(recipe("tiny_cpu", "dapo"), ["rl.prompts_per_step=5", "rl.mini_batch_prompts=2"])
    assert os.path.isdir(sft_root / "cpt" / "compressor")


def test_paper_recipes_follow_table_10():
    for name in ("qwen2.5-7b", "qwen2.5-32b"):
        cfg = recipe(name, "dapo")
        rl = cfg.rl
        assert (rl.prompts_per_step, rl.mini_batch_prompts, rl.group_size) == (128, 64, 16)
        assert (rl.temperature, rl.max_response_tokens, rl.overlong_buffer, rl.overlong_factor) == (1.0, 600, 100, 0.5)
        assert (rl.eps_low, rl.eps_high, rl.dynamic_warmup_steps) == (0.2, 0.28, 25)
        assert cfg.optim.lr_lora == cfg.optim.lr_full == 1e-6 and cfg.optim.min_lr_ratio == 1.0
        assert round(cfg.optim.warmup_ratio * cfg.optim.steps) == 10
        assert cfg.compressor.freeze_projection and cfg.run.deepspeed and cfg.run.zero_stage == 3


def test_two_zero3_ranks_reproduce_the_single_process_updates(sft_root, tmp_path):
    """DAPO on two ZeRO-3 ranks (DeepSpeed's CPU accelerator, gloo): each rank takes every second response of a
    mini-batch, and the loss is the token mean over both ranks' tokens -- not a mean of the two ranks' means --
    so every update's loss and gradient norm equal the single process's. It also covers the set-up under ZeRO-3
    (the collator built before the embedding is partitioned; generation under gathered weights: the same samples
    as one process)."""
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    extra = ("rl.dynamic_warmup_steps=3", "optim.steps=2")
    single, _ = _run(sft_root, tmp_path, "single", *extra)
    d = tmp_path / "zero3"
    d.mkdir()
    shutil.copytree(sft_root / "data", d / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29950 + os.getpid() % 40), "-m", "memcomp.trainers.dapo", "--recipe", "tiny_cpu",
           f"run.out_dir={json.dumps(str(d / 'rl'))}",
           f"compressor.init_from={json.dumps(str(sft_root / 'cpt' / 'compressor'))}", *RL, *extra,
           "run.deepspeed=true"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    useful = [ln for ln in out.stderr.splitlines() if "Warning" not in ln and "return func" not in ln]
    assert out.returncode == 0, "\n".join(useful[-60:])
    zero3 = [json.loads(line) for line in open(d / "rl" / "metrics.jsonl")]
    flat = lambda rs, k: [v for r in rs for v in r[k]]  # noqa: E731
    assert len(flat(single, "losses")) == 4 and any(flat(single, "losses"))
    assert flat(zero3, "losses") == pytest.approx(flat(single, "losses"), rel=1e-5, abs=1e-7)
    assert flat(zero3, "grad_norm") == pytest.approx(flat(single, "grad_norm"), rel=1e-4)
    for key in ("reward_mean", "response_length", "clip_fraction"):
        assert [r[key] for r in zero3] == pytest.approx([r[key] for r in single], rel=1e-6, abs=1e-7), key
