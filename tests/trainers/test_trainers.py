"""The CPT / SFT trainers: golden curve, kill-and-resume, checkpoint atomicity, LR groups, SFT's frozen
projection, the task mixtures, bad input, and two ZeRO-3 ranks reproducing the single-process run."""

import collections
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from memcomp.trainers import build, distributed
from memcomp.trainers.config import DAPOConfig, TrainConfig, apply_overrides, option_keys
from memcomp.trainers.cpt import main as cpt_main
from memcomp.trainers.recipes import RECIPES, recipe
from memcomp.trainers.sft import main as sft_main

from memcomp.data import PHASE_1, PHASE_2, DataError, JsonlReader, SampleStream
from memcomp.demo.data import prepare_demo_data
from memcomp.tasks import SampleBuilder

SMALL = ["optim.steps=3", "optim.samples_per_step=4", "run.save_every=0", "run.eval_every=0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The tiny recipe's data (corpus JSONL, synthetic QA, tokenizer), prepared once."""
    root = tmp_path_factory.mktemp("tiny")
    prepare_demo_data(apply_overrides(recipe("tiny_cpu", "cpt1"), [f"run.out_dir={json.dumps(str(root / 'cpt'))}"]))
    return root


def _run_dir(data_root, tmp_path, name="run"):
    d = tmp_path / name
    d.mkdir()
    shutil.copytree(data_root / "data", d / "data")
    return d


def _losses(out_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def _cpt(run, *extra):
    assert cpt_main(["--recipe", "tiny_cpu", f"run.out_dir={json.dumps(str(run / 'cpt'))}", *SMALL, *extra]) == 0
    return _losses(run / "cpt")


def test_golden_loss_curve(data_root, tmp_path):
    """The first steps of tiny_cpu, recorded on Python 3.11's stdlib corpus: a regression shows here."""
    if sys.version_info[:2] != (3, 11):
        pytest.skip("golden curve recorded on Python 3.11's standard-library corpus")
    losses = _cpt(_run_dir(data_root, tmp_path))
    golden = [7.648142603824013, 7.6283003489176435, 7.258393907055412]
    assert losses == pytest.approx(golden, rel=1e-4)


def test_kill_and_resume_reproduces_the_uninterrupted_run(data_root, tmp_path):
    full = _cpt(_run_dir(data_root, tmp_path, "full"), "optim.steps=4")
    run = _run_dir(data_root, tmp_path, "resumed")
    first = _cpt(run, "optim.steps=4", "run.stop_after=2")
    assert len(first) == 2 and os.path.isfile(run / "cpt" / "latest")
    resumed = _cpt(run, "optim.steps=4")
    assert resumed[:2] == first and len(resumed) == 4
    assert resumed == pytest.approx(full, rel=1e-6, abs=1e-7)


def test_run_directory_tells_the_truth_across_restarts(data_root, tmp_path, capsys):
    """metrics.jsonl holds each step once: lines a killed invocation wrote after its last checkpoint are dropped
    on resume, a fresh start empties it; runs.jsonl records every invocation; a log file gets plain lines."""
    run = _run_dir(data_root, tmp_path)
    _cpt(run, "optim.steps=4", "run.stop_after=2")
    metrics = run / "cpt" / "metrics.jsonl"
    with open(metrics, "a") as f:  # a step the killed invocation logged but never checkpointed, then a cut line
        f.write(json.dumps({"step": 3, "loss": 99.0}) + "\n" + '{"step": 4, "lo')
    losses = _cpt(run, "optim.steps=4")
    assert [json.loads(line)["step"] for line in open(metrics)] == [1, 2, 3, 4] and 99.0 not in losses
    runs = [json.loads(line) for line in open(run / "cpt" / "runs.jsonl")]
    assert [(r["resumed_from"], r["last_step"]) for r in runs] == [(0, 2), (2, 4)]
    _cpt(run, "optim.steps=4")  # finished: nothing trained, nothing appended, and it says so
    assert len(_losses(run / "cpt")) == 4
    err = capsys.readouterr().err
    assert "training already finished (4 steps" in err and "\r" not in err and "threads" in err
    assert "qa_train.jsonl" not in err  # a file the CPT mixture never reads is not reported


def test_trainer_help_lists_recipes_stages_and_options(capsys):
    for main, stages in ((cpt_main, "{cpt1,cpt2}"), (sft_main, "{sft,reasoner}")):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        assert "qwen2.5-7b,qwen2.5-32b,tiny_cpu" in out and stages in out
        assert "optim.samples_per_step=" in out and "run.threads=0" in out and "fqlora.rank=64" in out
        assert "rl.group_size" not in out  # the CPT / SFT trainers list their own options only


def test_every_option_is_settable_dotted_or_by_its_unique_short_name():
    cfg = recipe("tiny_cpu", "cpt1")
    for key, value in option_keys(cfg).items():  # each option round-trips through key=value
        raw = json.dumps(value)
        assert option_keys(apply_overrides(cfg, [f"{key}={raw}"]))[key] == value, key
    cfg = apply_overrides(cfg, ["optim.lr_full=1e-4", "compressor.chunk_size=8", "fqlora.rank=16", "steps=7"])
    assert (cfg.optim.lr_full, cfg.compressor.chunk_size, cfg.fqlora.rank, cfg.optim.steps) == (1e-4, 8, 16, 7)
    assert cfg.run == recipe("tiny_cpu", "cpt1").run  # the other sections untouched
    with pytest.raises(ValueError,
                       match=r"unknown option 'optim.stepz'; did you mean optim.steps\b.* Known: .*optim.steps"):
        apply_overrides(cfg, ["optim.stepz=3"])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        apply_overrides(cfg, ["compressor.chunk_size=0"])
    with pytest.raises(ValueError, match="expects float"):
        apply_overrides(cfg, ["optim.lr_full=fast"])
    with pytest.raises(ValueError, match="has no stage 'dapo'"):
        recipe("smollm2", "dapo")
    assert set(RECIPES) >= {"tiny_cpu", "smollm2", "qwen2.5-7b", "qwen2.5-32b"}
    assert isinstance(recipe("qwen2.5-7b", "sft"), TrainConfig) and isinstance(recipe("qwen2.5-7b", "dapo"), DAPOConfig)


def test_activation_checkpointing_leaves_the_losses_unchanged(data_root, tmp_path):
    plain = _cpt(_run_dir(data_root, tmp_path, "plain"))
    assert _cpt(_run_dir(data_root, tmp_path, "ckpt"), "compressor.activation_checkpointing=true") == pytest.approx(
        plain, rel=1e-6, abs=1e-7)
    assert recipe("qwen2.5-7b", "cpt1").compressor.activation_checkpointing


def test_a_crash_mid_write_never_looks_complete(data_root, tmp_path, monkeypatch):
    run = _run_dir(data_root, tmp_path)
    _cpt(run, "optim.steps=4", "run.stop_after=2")
    real_save = torch.save

    def crash(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        _cpt(run, "optim.steps=4", "run.stop_after=1")
    monkeypatch.setattr(torch, "save", real_save)
    assert (run / "cpt" / "latest").read_text() == "ckpt-0000002"      # still the last complete one
    assert not (run / "cpt" / "ckpt-0000003").exists()
    _cpt(run, "optim.steps=4")                                           # and it resumes from it


def test_param_groups_receive_the_recipe_learning_rates(data_root, tmp_path):
    run = _run_dir(data_root, tmp_path)
    cfg = apply_overrides(recipe("tiny_cpu", "cpt1"), [
        f"run.out_dir={json.dumps(str(run / 'cpt'))}", "fqlora.enabled=true", "fqlora.rank=4", "optim.lr_lora=1e-3",
        "optim.lr_full=2e-4", "optim.lr_proj=5e-3", "optim.warmup_ratio=0.5", "optim.steps=4"])
    cfg = prepare_demo_data(cfg)
    comp = build.build_compressor(cfg.compressor, cfg.fqlora, device="cpu", dtype="float32", seed=0)
    opt, sched = build.build_optimizer(cfg.optim, comp)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert {k: by_name[k]["lr"] for k in by_name} == pytest.approx({"lora": 1e-3 / 2, "full": 2e-4 / 2,
                                                                     "projection": 5e-3 / 2})  # warm-up step 1 of 2
    ids = {k: {id(p) for p in g["params"]} for k, g in by_name.items()}
    for name, p in comp.named_parameters():
        if not p.requires_grad:
            continue
        group = ("projection" if name.startswith("projection.") else
                 "lora" if name.endswith(("lora_A", "lora_B")) else "full")
        assert id(p) in ids[group], name
    # A parameter's actual update follows its group's learning rate (AdamW's first step moves by ~lr).
    p = comp.projection.weight
    before = p.detach().clone()
    samples = [s for s in build.build_stream(cfg.data, comp, stage="cpt1", seed=0).take(12) if s.task != "lm"]
    assert samples
    from memcomp.packing import PackingCollator

    comp(PackingCollator.from_compressor(comp, 4096)(samples)[0]).loss.backward()
    opt.step()
    step = (p.detach() - before).abs().max().item()
    assert 0.5 * by_name["projection"]["lr"] < step < 1.5 * by_name["projection"]["lr"]


def test_sft_leaves_the_projection_bit_for_bit_unchanged(data_root, tmp_path):
    run = _run_dir(data_root, tmp_path)
    _cpt(run, "optim.steps=2")
    from memcomp import MemoryCompressor

    cpt = MemoryCompressor.from_pretrained(run / "cpt" / "compressor")
    assert sft_main(["--recipe", "tiny_cpu", f"run.out_dir={json.dumps(str(run / 'sft'))}",
                     f"compressor.init_from={json.dumps(str(run / 'cpt' / 'compressor'))}", "optim.steps=2",
                     "optim.samples_per_step=4", "run.save_every=0", "run.eval_every=0"]) == 0
    sft = MemoryCompressor.from_pretrained(run / "sft" / "compressor")
    assert torch.equal(sft.projection.weight, cpt.projection.weight)
    assert torch.equal(sft.projection.bias, cpt.projection.bias)
    assert not torch.equal(sft.model.model.layers[0].mlp.up_proj.weight, cpt.model.model.layers[0].mlp.up_proj.weight)


def test_mixtures_match_the_paper():
    for mixture, expected in ((PHASE_1, {"reconstruction": 0.35, "continuation": 0.35, "lm": 0.30}),
                              (PHASE_2, {"continuation": 0.24, "qa": 0.165, "summarization": 0.105,
                                         "reconstruction": 0.09, "lm": 0.40})):
        assert mixture.expected() == pytest.approx(expected)
        rng = random.Random(0)
        counts = collections.Counter(mixture.draw(rng) for _ in range(40_000))
        for task, share in expected.items():
            assert counts[task] / 40_000 == pytest.approx(share, abs=0.01), task


def test_reader_shuffles_deterministically_and_resumes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    a = JsonlReader(str(path), "text", seed=3)
    first = [r["text"] for _, r in zip(range(120), a)]                 # 2.4 epochs
    assert sorted(first[:50]) == sorted(f"doc {i}" for i in range(50))  # each epoch is a permutation
    assert first[:50] != [f"doc {i}" for i in range(50)] and first[:50] != first[50:100]
    b = JsonlReader(str(path), "text", seed=3)
    head = [r["text"] for _, r in zip(range(70), b)]
    c = JsonlReader(str(path), "text", seed=3)
    c.seek(b.position)
    assert head + [r["text"] for _, r in zip(range(50), c)] == first


def test_phase2_stream_uses_every_task_and_bridge_count(base_tokenizer, tmp_path):
    text, qa, summ = tmp_path / "t.jsonl", tmp_path / "q.jsonl", tmp_path / "s.jsonl"
    words = " ".join(f"w{i}" for i in range(300))
    text.write_text("\n".join(json.dumps({"text": words}) for _ in range(5)) + "\n")
    qa.write_text(json.dumps({"context": words, "question": "Q?", "answer": "w1"}) + "\n")
    summ.write_text(json.dumps({"text": words, "summary": "w0 w1"}) + "\n")
    readers = {"text": JsonlReader(str(text), "text"), "qa": JsonlReader(str(qa), "qa"),
               "summary": JsonlReader(str(summ), "summary")}
    stream = SampleStream(SampleBuilder(base_tokenizer, "chatml", chunk_size=4), PHASE_2, readers, seed=0,
                          doc_tokens=200)
    samples = stream.take(600)
    tasks = collections.Counter(s.task for s in samples)
    assert set(tasks) == {"continuation", "qa", "summarization", "reconstruction", "lm"}
    bridges = collections.Counter(s.meta["n_bridge"] for s in samples if s.task == "continuation")
    assert set(bridges) == {0, 1, 2, 3, 4}


def test_bad_input_gives_clear_errors(data_root, tmp_path, capsys):
    with pytest.raises(DataError, match="data file not found"):
        JsonlReader(str(tmp_path / "missing.jsonl"), "text")
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(22)] + ["{not json", json.dumps({"txt": "x"}),
                                                                    json.dumps({"text": 3})]
    bad.write_text("\n".join(lines) + "\n")
    reader = JsonlReader(str(bad), "text", max_bad_fraction=0.1, shuffle=False)  # 1/23, 2/24 pass; 3/25 fails
    with pytest.raises(DataError, match="3 of 25 lines malformed"):
        for _ in zip(range(25), reader):
            pass
    tolerant = JsonlReader(str(bad), "text", max_bad_fraction=0.2, shuffle=False)
    got = [r for _, r in zip(range(22), tolerant)]
    assert len(got) == 22 and tolerant.bad == 0
    next(iter(tolerant))  # crosses the bad lines into the next epoch
    assert tolerant.bad == 3 and "3 malformed" in tolerant.report()
    # The trainers' command lines: one line naming the fault, exit status 2 (no traceback).
    run = _run_dir(data_root, tmp_path)
    plain = tmp_path / "plain_model"
    plain.mkdir()
    for args, why in ((["stepz=3"], "unknown option 'stepz'"), (["optim.steps=many"], "expects int"),
                      ([f"compressor.init_from={json.dumps(str(plain))}"], "not a saved MemoryCompressor"),
                      ([f"data.text_file={json.dumps(str(tmp_path / 'nope.jsonl'))}"], "data file not found")):
        assert cpt_main(["--recipe", "tiny_cpu", f"run.out_dir={json.dumps(str(run / 'cpt'))}", *SMALL, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m memcomp.trainers.cpt: error: ") and why in err and "Traceback" not in err


def _zero3(run, *extra, port_offset=0):
    """The tiny recipe's CPT on two ZeRO-3 ranks (DeepSpeed's CPU accelerator, gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29600 + port_offset + os.getpid() % 300), "-m", "memcomp.trainers.cpt", "--recipe", "tiny_cpu",
           f"run.out_dir={json.dumps(str(run / 'cpt'))}", *SMALL, "run.deepspeed=true", *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    useful = [ln for ln in out.stderr.splitlines() if "Warning" not in ln and "return func" not in ln]
    assert out.returncode == 0, "\n".join(useful[-60:])


def test_zero3_with_frozen_parameters_and_activation_checkpointing(data_root, tmp_path):
    """The 7B/32B recipes' combination at tiny scale: FQLoRA (frozen NF4 codes and norms in layers 1-2) with
    layers recomputed in backward, on two ZeRO-3 ranks, reproduces the single-process losses."""
    deepspeed = pytest.importorskip("deepspeed")
    if not distributed.deepspeed_can_checkpoint(deepspeed.__version__):
        pytest.skip(f"DeepSpeed {deepspeed.__version__} < 0.19.3 (the trainer refuses this combination there)")
    extra = ("fqlora.enabled=true", "compressor.activation_checkpointing=true")
    single = _cpt(_run_dir(data_root, tmp_path, "single"), *extra)
    run = _run_dir(data_root, tmp_path, "zero3")
    _zero3(run, *extra, port_offset=2)
    assert _losses(run / "cpt") == pytest.approx(single, rel=1e-5)


def test_two_zero3_ranks_reproduce_the_single_process_run_and_resume(data_root, tmp_path):
    """Step 1 gives rank 0 only plain-LM samples (no chunks): it must still run the same module passes as
    rank 1 (a weight-0 dummy chunk), or ZeRO-3's collectives mismatch."""
    pytest.importorskip("deepspeed")
    single = _cpt(_run_dir(data_root, tmp_path, "single"))
    run = _run_dir(data_root, tmp_path, "zero3")
    _zero3(run, "run.stop_after=2", port_offset=0)               # killed after step 2, then resumed
    _zero3(run, port_offset=1)
    assert _losses(run / "cpt") == pytest.approx(single, rel=1e-5)
    # The gradient itself, not only the losses (AdamW hides a constant factor in the gradient): DeepSpeed
    # averages over ranks, so without the world-size factor the two-rank gradient norm was half the token mean's.
    norms = lambda d: [json.loads(line)["grad_norm"] for line in open(d / "cpt" / "metrics.jsonl")]
    assert norms(run) == pytest.approx(norms(tmp_path / "single"), rel=1e-4)
    assert (run / "cpt" / "deepspeed" / "latest").read_text().strip() == "ckpt-0000003"
    from memcomp import MemoryCompressor

    assert MemoryCompressor.from_pretrained(run / "cpt" / "compressor").config.chunk_size == 4


def test_reasoner_stage_trains_on_trace_records(data_root, tmp_path, capsys):
    """``python -m memcomp.trainers.sft --stage reasoner``: LycheeMemory's reasoner SFT on trace records
    (memcomp.lychee.traces) from a CPT compressor; every kind of call trains, validation runs on its own trace file,
    the projection stays frozen; a missing trace file or none at all is a clear error."""
    from transformers import AutoTokenizer

    from memcomp import MemoryCompressor
    from memcomp.demo.corpus import stdlib_passages
    from memcomp.eval.synthetic import SyntheticConfig, generate_dataset
    from memcomp.lychee.traces import TraceConfig, trace_records

    run = _run_dir(data_root, tmp_path)
    _cpt(run, "optim.steps=2")
    tok = AutoTokenizer.from_pretrained(run / "data" / "tokenizer")
    files = {}
    for split, seed in (("train", 1), ("val", 2)):
        examples = generate_dataset(stdlib_passages()["train"], 3, SyntheticConfig(hops=1, num_distractors=2),
                                    seed=seed, tokenizer=tok)
        files[split] = run / f"traces_{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in trace_records(
            examples, tok, TraceConfig(block_tokens=32, chunk_tokens=32))))
    base = ["--recipe", "tiny_cpu", "--stage", "reasoner", f"run.out_dir={json.dumps(str(run / 'reasoner'))}",
            f"compressor.init_from={json.dumps(str(run / 'cpt' / 'compressor'))}", "optim.steps=4",
            "optim.samples_per_step=8", "run.save_every=0", "run.eval_every=2"]
    assert sft_main(base + [f"data.trace_file={json.dumps(str(files['train']))}",
                            f"data.val_trace_file={json.dumps(str(files['val']))}"]) == 0
    rows = [json.loads(line) for line in open(run / "reasoner" / "metrics.jsonl")]
    assert {k for r in rows for k in r["task_loss"]} == {"lychee_update", "memagent_update", "final_answer",
                                                         "full_context"}
    assert sum("val_loss" in r for r in rows) == 2
    cpt = MemoryCompressor.from_pretrained(run / "cpt" / "compressor")
    reasoner = MemoryCompressor.from_pretrained(run / "reasoner" / "compressor")
    assert torch.equal(reasoner.projection.weight, cpt.projection.weight)
    assert sft_main(base + ["data.trace_file=nowhere.jsonl", f"run.out_dir={json.dumps(str(run / 'r2'))}"]) == 2
    assert "data file not found: data.trace_file=nowhere.jsonl" in capsys.readouterr().err
    # The reasoner mixture without any trace file, on a recipe that does not write them: named.
    with pytest.raises(DataError, match="the trace task needs a 'trace' data file"):
        build.build_stream(apply_overrides(recipe("tiny_cpu", "reasoner"), []).data, reasoner, stage="reasoner",
                           seed=0)
