"""LycheeMemory against MemAgent, side by side in one run: the same synthetic questions at the same lengths with the
same generation settings (memcomp.lychee.harness.run_eval), on a real model (`pytest bench/ --benchmark -k lychee`).
Issue 12's target: LycheeMemory >= 6x faster and >= 2x lower peak memory than MemAgent at 112K tokens and beyond on a
GPU (the paper's claim); on a CPU, the ratio at the longest length that finishes in the bench budget, explained by
where the time goes (prefill, decode, gate).

Systems: ``lychee-nogate`` (every block read: the most LycheeMemory can cost for a given store; a gate only skips
blocks), ``lychee`` when a trained gate is given (MEMCOMP_BENCH_GATE), and ``memagent``. Per length the row gives
both systems' time per question, peak memory, positions prefilled, tokens generated, and the split of LycheeMemory's
time into gate, memory updates (prefill + decode of each step) and the final answer; the speed-up and memory ratio
are MemAgent's over LycheeMemory's, from the same run. Block-store encoding is question-independent (paid once per
input) and reported apart (``encode_s``), as the paper reports it.

Model and settings: MEMCOMP_BENCH_COMPRESSOR (a saved MemoryCompressor, e.g. a user's Qwen2.5-7B checkpoint; with
MEMCOMP_BENCH_GATE its gate), else MEMCOMP_BENCH_MODEL (default smollm2-135m-instruct) wrapped as an untrained
compressor at C = 4: its answers mean nothing, its costs are the real model's. MEMCOMP_BENCH_LYCHEE_LENGTHS
(comma-separated tokens) replaces the lengths: on a CPU 4096 tokens, one question, 64-token memory updates and
16-token answers (at 1,024 tokens one question took 13 s without the gate and 20 s with MemAgent on one CPU thread,
most of it decoding; the block store's encoding 6 s); on a GPU 32K ... 128K, four questions, with the papers'
1,024-token limits. Both use 4,096-token blocks and MemAgent's 5,000-token chunks, greedy decoding, one question at a
time. Peak memory on a CPU is the growth of the process's peak RSS during each call (RunCost.peak_memory_kind)."""

import os

import torch
from benchutil import DEVICE, HAS_CUDA, metadata

from memcomp.lychee.harness import HarnessConfig, format_table, load_items, ratios, run_eval, write_report
from memcomp.lychee.reasoner import GenerationSettings

COLUMNS = ["system", "tokens", "questions", "s_per_q", "speedup", "peak_MB", "peak_ratio", "prefilled",
           "generated", "blocks", "gate_s", "update_s", "answer_s", "encode_s", "accuracy"]
CPU_LENGTHS, GPU_LENGTHS = (4096,), (32768, 65536, 114688, 131072)


def _lengths():
    env = os.environ.get("MEMCOMP_BENCH_LYCHEE_LENGTHS")
    if env:
        return tuple(int(x) for x in env.split(",") if x.strip())
    return GPU_LENGTHS if HAS_CUDA else CPU_LENGTHS


def _setup():
    from memcomp import CompressorConfig, MemoryCompressor
    from memcomp.lychee.gate import Gate
    from memcomp.models import load_pretrained

    saved = os.environ.get("MEMCOMP_BENCH_COMPRESSOR")
    if saved:
        comp = MemoryCompressor.from_pretrained(saved, device=DEVICE,
                                                dtype=torch.bfloat16 if HAS_CUDA else torch.float32)
    else:
        model, tok = load_pretrained(os.environ.get("MEMCOMP_BENCH_MODEL", "smollm2-135m-instruct"), device=DEVICE,
                                     dtype=torch.bfloat16 if HAS_CUDA else torch.float32)
        comp = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=4))
    gate_dir = os.environ.get("MEMCOMP_BENCH_GATE")
    return comp, (Gate.load(gate_dir, comp) if gate_dir else None)


def test_lychee_vs_memagent(bench, request, tmp_path):
    from memcomp.rl.engine import HFEngine

    comp, gate = _setup()
    settings = (GenerationSettings(temperature=0, top_p=1.0) if HAS_CUDA else
                GenerationSettings(memory_tokens=64, answer_tokens=16, temperature=0, top_p=1.0))
    systems = (("lychee",) if gate is not None else ()) + ("lychee-nogate", "memagent")
    cfg = HarnessConfig(systems=systems, generation=settings, block_tokens=4096, chunk_tokens=5000,
                        store_dir=str(tmp_path / "stores"))
    num_questions = 4 if HAS_CUDA else 1
    items = load_items("synthetic", comp.tokenizer, list(_lengths()), num_questions=num_questions, hops=2)
    report = run_eval(comp, HFEngine(comp), items, cfg, gate=gate, progress=False, task="synthetic")
    by = {(r["system"], r["length"]): r for r in report["rows"]}
    ours = "lychee" if gate is not None else "lychee-nogate"
    speed = {x["length"]: x for x in ratios(report, ours, "memagent")}
    for r in report["rows"]:
        base = by[("memagent", r["length"])]
        bench.add({"system": r["system"], "tokens": r["length"], "questions": r["num_questions"],
                   "s_per_q": r["seconds_per_question"],
                   "speedup": base["seconds_per_question"] / r["seconds_per_question"],
                   "peak_MB": r["peak_memory_bytes"] / 2**20,
                   "peak_ratio": (base["peak_memory_bytes"] / r["peak_memory_bytes"]) if r["peak_memory_bytes"]
                   else None,
                   "prefilled": r["positions_prefilled"], "generated": r["tokens_generated"],
                   "blocks": f"{r['blocks_read']:.0f}/{r['blocks_total']:.0f}",
                   "gate_s": r["gate_seconds_per_question"], "update_s": r["memory_seconds_per_question"],
                   "answer_s": r["answer_seconds_per_question"], "encode_s": r["encode_seconds"],
                   "accuracy": r["accuracy"]})
    if HAS_CUDA or os.environ.get("MEMCOMP_RESULTS_DIR"):
        from benchutil import RESULTS_DIR

        write_report(report, RESULTS_DIR, name="lychee_eval")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nlychee vs memagent -- {metadata()['mode']}\n" + format_table(report))
        for n, x in sorted(speed.items()):
            peak = "n/a" if x["peak_memory_ratio"] is None else f"{x['peak_memory_ratio']:.2f}x"
            print(f"{n} tokens, MemAgent / {ours}: time per question {x['speedup']:.2f}x, positions prefilled "
                  f"{x['prefill_ratio']:.2f}x, peak memory {peak} (above 1: {ours} costs less)")
    # Same questions, same lengths, both systems: every length has a row for each, and the ratio is from this run.
    assert sorted(speed) == sorted(_lengths())
    for n in _lengths():
        assert by[(ours, n)]["num_questions"] == by[("memagent", n)]["num_questions"] == num_questions
