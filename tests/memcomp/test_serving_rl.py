"""DAPO with ``rl.engine=vllm``: rollouts come from ``memcomp.serving.VLLMEngine`` and the trainer pushes the decoder's
new weights into the running engine after each step, so every rollout samples from the current policy.

The vLLM engine the trainer builds is replaced by a subclass that, before each rollout call and once more when the
trainer closes it (after the last step's push), runs a greedy probe on vLLM and on ``HFEngine`` over the
compressor's live weights. Every probe must agree (tokens, and log-probabilities within the parity tests'
``LOGPROB_ATOL``), and the probes' log-probabilities must move between the first rollout and the end by far more
than that tolerance: the weights really changed, so vLLM can only agree because the trainer synced it (without the
push, ``VLLMEngine.generate`` refuses stale weights outright). Full fine-tuning and FQLoRA (HF runs NF4 + LoRA, vLLM
the merged dense weights). Needs vLLM (scripts/setup_serving.sh); the error without it is tested wherever vLLM is
absent."""

import json
import shutil

import pytest
import torch
from memcomp.trainers import dapo
from memcomp.trainers.config import apply_overrides
from memcomp.trainers.cpt import main as cpt_main
from memcomp.trainers.recipes import recipe

from memcomp.rl.engine import GenerationRequest, HFEngine, SamplingOptions
from memcomp.serving import vllm_available

needs_vllm = pytest.mark.skipif(
    not vllm_available(), reason="vLLM is not installed (scripts/setup_serving.sh builds the serving environment)")

# The parity tests' tolerance (test_serving_engine.py): fp32 summation order only, measured ~1e-5 on tiny models.
LOGPROB_ATOL = 2e-3
# Head width 32 (hidden 128 over the tiny recipe's 4 heads): vLLM's CPU attention takes a fixed set of head sizes.
# Three layers: FQLoRA fully trains the first and the last, so the middle one is NF4 + LoRA.
TINY = ["compressor.tiny_hidden=128", "compressor.tiny_layers=3", "compressor.tiny_vocab=512", "data.doc_tokens=16"]
# Two steps of two updates each; a learning rate large enough that two steps move the policy measurably.
RL = ["optim.steps=2", "rl.group_size=4", "rl.prompts_per_step=4", "rl.mini_batch_prompts=2", "rl.gen_prompts=2",
      "rl.max_response_tokens=6", "rl.overlong_buffer=2", "rl.dynamic_warmup_steps=3", "data.doc_tokens=16",
      "run.save_every=0", "optim.lr_full=3e-3"]


def test_vllm_engine_option_is_validated():
    assert apply_overrides(recipe("tiny_cpu", "dapo"), ["rl.engine=vllm"]).rl.engine == "vllm"
    with pytest.raises(ValueError, match="rl.engine must be hf .* or vllm"):
        apply_overrides(recipe("tiny_cpu", "dapo"), ["rl.engine=sglang"])


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_vllm_engine_without_vllm_is_a_clear_error_before_any_work(tmp_path):
    cfg = apply_overrides(recipe("tiny_cpu", "dapo"), ["rl.engine=vllm", f"run.out_dir={json.dumps(str(tmp_path))}"])
    with pytest.raises(ImportError, match=r"rl.engine=vllm: vLLM is not installed.*scripts/setup_serving.sh"):
        dapo.train(cfg)
    assert not any(tmp_path.iterdir())  # refused before data preparation or any model was built


def _probe_requests(comp):
    """A plain prompt and one with a (fixed, random) memory block in the ChatML layout DAPO uses."""
    g = torch.Generator().manual_seed(0)
    mem = 0.02 * torch.randn(3, comp.hidden_size, generator=g)
    before = comp.tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    return [GenerationRequest(None, "the"),
            GenerationRequest(mem, "\nWhat does it say?<|im_end|>\n<|im_start|>assistant\n", prefix=before)]


PROBE = SamplingOptions(temperature=0, max_new_tokens=6, return_logprobs=True)


@pytest.fixture
def probed_engine(monkeypatch):
    """Swap the trainer's VLLMEngine for a subclass that probes vLLM against HF before each rollout call and when
    closed; yields the list of engines the trainer built."""
    from memcomp.serving import VLLMEngine

    built = []

    class ProbedEngine(VLLMEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kwargs = kwargs
            self.probes = []  # (vLLM results, HF results) per probe
            self.updates = 0
            built.append(self)

        def _probe(self):
            reqs = _probe_requests(self.compressor)
            self.probes.append((super().generate(reqs, PROBE), HFEngine(self.compressor).generate(reqs, PROBE)))

        def generate(self, requests, options):
            self._probe()
            return super().generate(requests, options)

        def update_weights(self, state_dict=None):
            super().update_weights(state_dict)
            self.updates += 1

        def close(self):
            if self.alive:
                self._probe()
            super().close()

    monkeypatch.setattr(dapo, "VLLMEngine", ProbedEngine)
    return built


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory):
    """A tiny compressor (two CPT steps) and the demo data: what DAPO continues from here."""
    root = tmp_path_factory.mktemp("sft")
    assert cpt_main(["--recipe", "tiny_cpu", f"run.out_dir={json.dumps(str(root / 'cpt'))}", "optim.steps=2",
                     "optim.samples_per_step=4", "run.save_every=0", "run.eval_every=0", *TINY]) == 0
    return root


# FQLoRA: NF4 + LoRA on the middle layer, full fine-tuning on the others; the engine gets the merged dense weights
# (NF4 dequantized, LoRA folded in) and HF runs the fused NF4 + LoRA kernels: the probes compare the two.
FQLORA = ["fqlora.enabled=true", "fqlora.rank=8", "fqlora.dropout=0.0", "optim.lr_lora=3e-3"]


def _qa_file(root, run):
    """An answer an untrained policy gets right by chance in some of its responses and not in others (a letter
    somewhere in the response): groups with reward variance, hence nonzero advantages and a real update."""
    run.mkdir()
    shutil.copytree(root / "data", run / "data")
    qa = run / "qa.jsonl"
    passages = [json.loads(line)["context"] for line in open(root / "data" / "qa_train.jsonl")][:8]
    qa.write_text("".join(json.dumps({"context": c, "question": "Say something.", "answers": ["e"]}) + "\n"
                          for c in passages))
    return qa


def _overrides(root, run, qa):
    return [f"run.out_dir={json.dumps(str(run / 'out'))}", f"data.qa_file={json.dumps(str(qa))}",
            f"compressor.init_from={json.dumps(str(root / 'cpt' / 'compressor'))}", *TINY, *RL, "rl.engine=vllm",
            "rl.match=sub_em", "rl.boxed=false"]


@needs_vllm
@pytest.mark.parametrize("fqlora", [False, True], ids=["full", "fqlora"])
def test_dapo_rollouts_on_vllm_follow_the_updated_policy(sft_root, tmp_path, probed_engine, fqlora):
    run = tmp_path / "rl"
    qa = _qa_file(sft_root, run)
    cfg = apply_overrides(recipe("tiny_cpu", "dapo"), [*_overrides(sft_root, run, qa),
                                                       *(FQLORA if fqlora else ["fqlora.enabled=false"])])
    summary = dapo.train(cfg)
    lora_b = [p for n, p in summary["compressor"].named_parameters() if n.endswith("lora_B")]
    assert bool(lora_b) == fqlora and all(float(p.detach().abs().max()) > 0 for p in lora_b)  # B starts at 0: trained

    assert [r["step"] for r in summary["history"]] == [1, 2]
    assert any(loss for r in summary["history"] for loss in r["losses"])  # the policy was really updated
    assert len(probed_engine) == 1
    engine = probed_engine[0]
    assert not engine.alive  # closed by the trainer
    assert engine.updates == 2  # one push per step
    # Sized from the run: every rollout of a generation batch (2 prompts x 4) fits at once.
    assert engine.kwargs["max_num_seqs"] == 8 and engine.kwargs["enforce_eager"] is True
    assert len(engine.probes) >= 3  # the first rollout, at least one after step 1's push, and the end
    for k, (ours, ref) in enumerate(engine.probes):
        for o, r in zip(ours, ref):
            assert o[0].token_ids == r[0].token_ids, f"probe {k}"
            torch.testing.assert_close(o[0].logprobs, r[0].logprobs, rtol=0, atol=LOGPROB_ATOL)
    first, last = engine.probes[0][1], engine.probes[-1][1]
    moved = max(float((a[0].logprobs[:1] - b[0].logprobs[:1]).abs().max()) for a, b in zip(first, last))
    assert moved > 10 * LOGPROB_ATOL, f"the policy barely moved ({moved:.1e}): the test would not see a stale engine"
    # After the run, the engine's last greedy answers are HF generate's on the trained compressor the run returns.
    final = HFEngine(summary["compressor"]).generate(_probe_requests(summary["compressor"]), PROBE)
    assert [r[0].token_ids for r in final] == [o[0].token_ids for o in engine.probes[-1][0]]


@needs_vllm
def test_two_zero3_ranks_with_vllm_reproduce_the_single_process_run(sft_root, tmp_path):
    """Two ZeRO-3 ranks (DeepSpeed's CPU accelerator, gloo), the vLLM engine on rank 0 alone: every rank gathers the
    weights for the engine's start and for each push, the other rank mirrors the engine's embedding lookup (ZeRO-3
    traces module calls on every rank), and rank 0's groups reach it. Losses, gradient norms and rewards equal one
    process's (the rollouts are the same seeded vLLM samples)."""
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys

    single_run = tmp_path / "single"
    qa = _qa_file(sft_root, single_run)
    dapo.train(apply_overrides(recipe("tiny_cpu", "dapo"), [*_overrides(sft_root, single_run, qa),
                                                            "fqlora.enabled=false"]))
    zero3_run = tmp_path / "zero3"
    qa = _qa_file(sft_root, zero3_run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29900 + os.getpid() % 40), "-m", "memcomp.trainers.dapo", "--recipe", "tiny_cpu",
           *_overrides(sft_root, zero3_run, qa), "fqlora.enabled=false", "run.deepspeed=true"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    useful = [ln for ln in out.stderr.splitlines() if "Warning" not in ln and not ln.startswith("(")]
    assert out.returncode == 0, "\n".join(useful[-60:])
    read = lambda run: [json.loads(line) for line in open(run / "out" / "metrics.jsonl")]  # noqa: E731
    single, zero3 = read(single_run), read(zero3_run)
    flat = lambda rs, k: [v for r in rs for v in r[k]]  # noqa: E731
    assert len(flat(single, "losses")) == 4 and any(flat(single, "losses"))
    assert flat(zero3, "losses") == pytest.approx(flat(single, "losses"), rel=1e-4, abs=1e-6)
    assert flat(zero3, "grad_norm") == pytest.approx(flat(single, "grad_norm"), rel=1e-4)
    for key in ("reward_mean", "response_length", "clip_fraction"):
        assert [r[key] for r in zero3] == pytest.approx([r[key] for r in single], rel=1e-6, abs=1e-7), key
