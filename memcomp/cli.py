"""memcomp command line.

  memcomp demo [--preset P] [--stage cpt|sft|rl] [key=value ...]   the main job: train and show memory is read
  memcomp ask --input FILE --question Q                             answer a question about a long document
  memcomp eval --task T --systems S --lengths L                     LycheeMemory vs MemAgent vs full context
  memcomp bench ttft                                                time to first token and peak memory
  memcomp serve COMPRESSOR_DIR                                      HTTP service (vLLM)
  memcomp info                                                      versions, devices, backend
"""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from memcomp.demo.run import cpu_refusal, make_config, run

    try:
        cfg, _ = make_config(args.preset, args.stage, args.overrides)
    except (ValueError, TypeError) as exc:
        print(f"memcomp demo: {exc}", file=sys.stderr)
        return 2
    refusal = cpu_refusal(args.preset, cfg)  # a GPU-only preset (smollm2) on a CPU: how long it would take
    if refusal:
        print(f"memcomp demo: {refusal}", file=sys.stderr)
        return 2
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        why = "" if any(o.startswith(("device=", "run.device=")) for o in args.overrides) else (
            f" (the {args.preset!r} preset runs on a GPU; `memcomp demo` alone is the CPU demo)")
        print(f"memcomp demo: device=cuda but CUDA is not available{why}", file=sys.stderr)
        return 2
    if args.stage in ("sft", "rl", "lychee") and not os.path.isdir(cfg.compressor.init_from):
        preset = "" if args.preset == "tiny" else f" --preset {args.preset}"
        previous = {"sft": ("CPT", f"memcomp demo{preset}"), "rl": ("SFT", f"memcomp demo{preset} --stage sft"),
                    "lychee": ("CPT", f"memcomp demo{preset}")}[args.stage]
        print(f"memcomp demo --stage {args.stage} continues from the {previous[0]} demo: {cfg.compressor.init_from} "
              f"not found; run `{previous[1]}` first (or pass init_from=...)", file=sys.stderr)
        return 2
    try:
        s = run(args.preset, args.stage, args.overrides)
    except (ValueError, FileExistsError) as exc:  # a bad setting, or a folder that is not this run's: nothing lost
        print(f"memcomp demo: error: {exc}", file=sys.stderr)
        return 2
    if args.stage == "rl":
        return _print_rl(args, s)
    if args.stage == "lychee":
        return _print_lychee(args, s)
    ev = s["eval"]
    now = ("" if s["steps_trained_now"] else ", already trained: evaluation only") + (
        f"; this run {s['invocation_seconds'] / 60:.1f} min")
    print(f"\nmemcomp demo, {args.stage} ({args.preset}, {s['compression']} compression, "
          f"{s['parameters'] / 1e6:.1f}M params, trained {s['train_seconds'] / 60:.1f} min, "
          f"evaluated {s['eval_seconds'] / 60:.1f} min{now})")
    by_task = ", ".join(f"{k} {v:.3f}" for k, v in sorted(s["final_task_loss"].items()))
    print(f"  final training loss by task   {by_task}")
    print("  held-out                       right memory   control (another passage's memory)")
    rows = ([("greedy reconstruction accuracy", "token_accuracy"), ("ROUGE-L F1", "rouge_l"),
             ("teacher-forced accuracy", "teacher_forced_accuracy")] if args.stage == "cpt"
            else [("answer accuracy", "answer_accuracy")])
    for label, key in rows:
        ci = lambda name: (f" [{ev[name + '_ci95'][0]:.3f}, {ev[name + '_ci95'][1]:.3f}]"
                           if name + "_ci95" in ev else "")
        print(f"  {label:<30}{ev['memory_' + key]:>11.3f}{ci('memory_' + key)}   "
              f"{ev['control_' + key]:.3f}{ci('control_' + key)}")
    verdict = "yes" if s["memory_carries_information"] else "NO"
    ratios = ", ".join(f"{k} {v:.1f}x" for k, v in s["memory_vs_control_ratios"].items())
    if args.stage == "cpt":
        print(f"  memory carries information (>= 2x control): {verdict} ({ratios})")
    else:
        lo, hi = ev["answer_accuracy_difference_ci95"]
        print(f"  {ev['questions']} questions on {ev['passages']} passages; right minus control "
              f"{ev['answer_accuracy_difference']:+.3f}, 95 % interval [{lo:+.3f}, {hi:+.3f}]")
        print(f"  memory carries information (interval above 0): {verdict} ({ratios})")
    if args.preset == "smoke":
        print("  (a smoke run is a few steps at toy sizes: it checks the pipeline, it is not expected to learn)")
    print(f"  wrote {s['out_dir']}/summary.json, loss.png, compressor/, metrics.jsonl, runs.jsonl, checkpoints")
    return 0


def _print_lychee(args: argparse.Namespace, s: dict) -> int:
    st = s["settings"]
    print(f"\nmemcomp demo, lychee ({args.preset}, {s['compression']} compression, "
          f"{s['parameters'] / 1e6:.1f}M params; reasoner SFT {s['train_seconds'] / 60:.1f} min, "
          f"gate {s['gate_seconds'] / 60:.1f} min, evaluation "
          f"{s['eval_seconds'] / 60:.1f} min; this run {s['invocation_seconds'] / 60:.1f} min)")
    print(f"  synthetic task: {st['hops']}-hop questions over {st['context_tokens']}-token contexts; blocks of "
          f"{st['block_tokens']} tokens, MemAgent chunks of {st['chunk_tokens']}; greedy")
    for mode in ("prefilter", "sequential"):
        g = s["gate"]["heldout"][mode]
        print(f"  gate ({mode}) on held-out blocks: recall {g['recall']:.3f}, precision {g['precision']:.3f}, "
              f"blocks skipped {g['skipped']:.2f}, AUC {g['auc'] if g['auc'] is None else round(g['auc'], 3)}")
    print("  each call alone, from the ideal inputs (held-out trace records; greedy output equals the target):")
    for name, c in s["calls"].items():
        print(f"    {name:<30} {c['exact']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]  n={c['n']}")
    print("  end to end (held-out questions):")
    print(s["table"])
    rss = any("rss" in r.get("peak_memory_kind", "") for r in s["rows"])
    for r in s["ratios_vs_memagent"]:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "n/a"
        prefill = f"{r['prefill_ratio']:.2f}x" if r["prefill_ratio"] else "n/a"
        mem = "" if rss or not r["peak_memory_ratio"] else f", peak memory {r['peak_memory_ratio']:.2f}x"
        print(f"  MemAgent / LycheeMemory at {r['length']} tokens (above 1: LycheeMemory costs less): time per "
              f"question {speed}, positions prefilled {prefill}{mem}")
    if rss:
        print("  (peak memory on a CPU is the growth of the process's peak RSS over a call: with a 3.5M-parameter "
              "model it is allocator noise, not a comparison)")
    if args.preset == "smoke":
        print("  (a smoke run is a few steps at toy sizes: it checks the pipeline, it is not expected to learn)")
    print(f"  wrote {s['out_dir']}/summary.json, eval.json, eval.md, compressor/, gate/, metrics.jsonl")
    return 0


def _print_rl(args: argparse.Namespace, s: dict) -> int:
    ev = s["eval"]
    now = ("" if s["steps_trained_now"] else ", already trained: evaluation only") + (
        f"; this run {s['invocation_seconds'] / 60:.1f} min")
    print(f"\nmemcomp demo, rl ({args.preset}, DAPO from the SFT demo, {s['compression']} compression, "
          f"{s['parameters'] / 1e6:.1f}M params, trained {s['train_seconds'] / 60:.1f} min, "
          f"evaluated {s['eval_seconds'] / 60:.1f} min{now})")
    print(f"  train questions (sampled rollouts): accuracy {s['train_accuracy_first']:.3f} over the first 5 steps, "
          f"{s['train_accuracy_last']:.3f} over the last 5; kept groups {s['kept_fraction_mean']:.2f}")
    print("  held-out answer accuracy         right memory            control (another passage's memory)")
    for name, label in (("sft", "after SFT"), ("rl", "after RL")):
        m = ev[name]
        lo, hi = m["memory_answer_accuracy_ci95"]
        clo, chi = m["control_answer_accuracy_ci95"]
        print(f"  {label:<32}{m['memory_answer_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]   "
              f"{m['control_answer_accuracy']:.3f} [{clo:.3f}, {chi:.3f}]")
    lo, hi = ev["rl_minus_sft_ci95"]
    verdict = "yes" if s["rl_above_sft"] else "NO"
    print(f"  {ev['sft']['questions']} questions on {ev['sft']['passages']} passages; RL minus SFT "
          f"{ev['rl_minus_sft']:+.3f}, 95 % interval [{lo:+.3f}, {hi:+.3f}], "
          f"{ev['rl_minus_sft_z']:.1f} standard errors")
    print(f"  RL above SFT by more than two standard errors: {verdict}")
    print(f"  wrote {s['out_dir']}/summary.json, reward.png, compressor/, metrics.jsonl, checkpoints")
    return 0


def _ttft_defaults(args: argparse.Namespace) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if args.device is None:
        args.device = "cuda" if cuda else "cpu"
    on_gpu = args.device.startswith("cuda")
    if args.model_config is None:
        args.model_config = "qwen2.5-7b" if on_gpu else "tiny"
    if args.lengths is None:
        args.lengths = "4k,8k,16k,32k,64k,120k" if on_gpu else "256,1k"
    if args.dtype is None:
        args.dtype = "bfloat16" if on_gpu else "float32"


def _bench_ttft(args: argparse.Namespace) -> int:
    from memcomp.ttft import TTFTConfig, format_table, parse_lengths, run_ttft, write_outputs

    _ttft_defaults(args)

    try:
        cfg = TTFTConfig(model_config=args.model_config, lengths=parse_lengths(args.lengths),
                         chunk_size=args.chunk_size, question_tokens=args.question_tokens, warmup=args.warmup,
                         runs=args.runs, device=args.device, dtype=args.dtype, end_to_end=not args.no_end_to_end,
                         out_dir=args.out)
        from memcomp.model_configs import MODEL_CONFIGS
        from memcomp.models import MODELS

        known = [*MODEL_CONFIGS, *MODELS]  # random weights of a real shape, or a real pretrained model
        if cfg.model_config not in known:
            raise ValueError(f"unknown model config {cfg.model_config!r}; choose one of {', '.join(known)}")
    except ValueError as exc:
        print(f"memcomp bench ttft: {exc}", file=sys.stderr)
        return 2
    result = run_ttft(cfg, on_row=lambda partial: write_outputs(partial, cfg.out_dir, with_plot=False))
    print()
    print(format_table(result))
    for kind, path in write_outputs(result, cfg.out_dir).items():
        print(f"wrote {kind}: {path}")
    return 0


# --------------------------------------------------------------------------------------------------
# memcomp ask / memcomp eval (LycheeMemory)
# --------------------------------------------------------------------------------------------------

def _lychee_options(p: argparse.ArgumentParser) -> None:
    """Options ``ask`` and ``eval`` share: the model, compressor and gate, and the generation settings."""
    p.add_argument("--compressor", default=None, help="a saved MemoryCompressor folder (save_pretrained); without "
                   "it, --model is wrapped as an untrained compressor (its memory carries little: for cost only)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model to wrap when no --compressor is given: a "
                   "registered name, a Hugging Face folder or a GGUF file (default smollm2-135m-instruct)")
    p.add_argument("--gate", default=None, help="a gate folder saved by python -m memcomp.trainers.gate for this "
                   "compressor")
    p.add_argument("--gate-mode", default="sequential", choices=("sequential", "prefilter"))
    p.add_argument("--block-tokens", type=int, default=4096, help="tokens per memory block (default 4096)")
    p.add_argument("--memory-tokens", type=int, default=1024, help="working-memory cap (default 1024)")
    p.add_argument("--answer-tokens", type=int, default=1024, help="final answer limit (default 1024)")
    p.add_argument("--question-tokens", type=int, default=1024, help="longest question accepted (default 1024)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; MemAgent's eval: 0.7")
    p.add_argument("--top-p", type=float, default=1.0, help="default 1.0; MemAgent's eval: 0.95")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--engine", default="hf", choices=("hf", "vllm"), help="generation engine: hf (Hugging Face "
                   "generate, default) or vllm (memcomp.serving.VLLMEngine on prompt embeddings; needs vLLM, on a CPU "
                   "the environment scripts/setup_serving.sh builds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _lychee_setup(args: argparse.Namespace, who: str):
    """(compressor, engine, gate or None, GenerationSettings) from the shared options. Raises what loading raises."""
    import torch

    from memcomp.lychee.reasoner import GenerationSettings
    from memcomp.rl.engine import HFEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    if args.engine == "vllm":  # before the model loads
        from memcomp.serving.engine import INSTALL_HINT, vllm_available

        if not vllm_available():
            raise ValueError(f"--engine vllm: {INSTALL_HINT}")
    settings = GenerationSettings(memory_tokens=args.memory_tokens, answer_tokens=args.answer_tokens,
                                  question_tokens=args.question_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed)
    from memcomp import CompressorConfig, MemoryCompressor

    if args.compressor is not None:
        if not os.path.isdir(args.compressor):
            raise FileNotFoundError(f"--compressor {args.compressor}: no such folder")
        compressor = MemoryCompressor.from_pretrained(args.compressor, device=device)
    else:
        from memcomp.models import load_pretrained

        print(f"{who}: no --compressor: wrapping {args.model} as an untrained compressor (answers from its memory "
              "mean little; train one with python -m memcomp.trainers.cpt)", file=sys.stderr)
        model, tok = load_pretrained(args.model, device=device)
        compressor = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=4))
    gate = None
    if args.gate is not None:
        from memcomp.lychee.gate import Gate

        gate = Gate.load(args.gate, compressor)  # MemoryMismatchError for a gate of another compressor
    if args.engine == "hf":
        return compressor, HFEngine(compressor), gate, settings
    from memcomp.serving import VLLMEngine, kv_cache_bytes

    # Prompts up to the model's window (the full-context baseline fills it); a KV cache for as many such sequences
    # as one engine call runs (eval: --batch-size questions; ask: one), more queue inside vLLM.
    window = compressor.model.config.max_position_embeddings
    sequences = getattr(args, "batch_size", 1)
    kwargs = {} if device.startswith("cuda") else {"enforce_eager": True}  # no torch.compile start-up on a CPU
    engine = VLLMEngine(compressor, max_model_len=window, kv_cache_memory_bytes=kv_cache_bytes(
        compressor, sequences, window), max_num_seqs=sequences, seed=0 if args.seed is None else args.seed, **kwargs)
    return compressor, engine, gate, settings


def _close(engine) -> None:
    """Stop a vLLM engine's processes (``HFEngine`` holds none)."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from memcomp.memory import MemoryFileError, MemoryMismatchError

    return _USER_ERRORS + (MemoryFileError, MemoryMismatchError)


def _ask(args: argparse.Namespace) -> int:
    from memcomp.lychee.harness import ask

    try:
        if not os.path.isfile(args.input):  # checked before the model loads
            raise FileNotFoundError(f"input file {args.input} not found")
        if os.path.getsize(args.input) == 0:
            raise ValueError(f"input file {args.input} is empty")
        compressor, engine, gate, settings = _lychee_setup(args, "memcomp ask")
        try:
            out = ask(compressor, engine, args.input, args.question, gate=gate, settings=settings,
                      block_tokens=args.block_tokens, gate_mode=args.gate_mode, store_dir=args.store,
                      cache_dir=args.cache_dir, progress=False if args.no_progress else None)
        finally:
            _close(engine)
    except _user_errors() as exc:
        print(f"memcomp ask: {exc}", file=sys.stderr)
        return 2
    r, store = out.result, out.store
    how = "reused (nothing encoded)" if out.store_reused else "built"
    print(f"block store: {store.directory} ({len(store)} blocks of up to {store.block_tokens} tokens, "
          f"{how} in {out.store_seconds:.1f} s)")
    print(f"answer: {r.answer}")
    gated = "gate " + args.gate_mode if gate is not None else "no gate: every block"
    print(f"blocks read: {len(r.steps)} of {len(store)} ({gated})")
    for block, score, text in out.cited:
        s = f"score {score:.3f}" if score is not None else "no score"
        print(f"  [{block}] {s}  {text}")
    c = r.cost
    print(f"cost: {r.run.wall_seconds:.1f} s, {c.positions_prefilled} positions prefilled, {c.gate_positions} gate "
          f"positions, {c.tokens_generated} tokens generated, peak memory {r.run.peak_memory_bytes / 2**20:.0f} MB "
          f"({r.run.peak_memory_kind})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from memcomp.lychee.harness import HarnessConfig, format_table, load_items, ratios, run_eval, write_report
    from memcomp.ttft import parse_lengths

    try:
        systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
        lengths = parse_lengths(args.lengths)
        depths = tuple(float(d) for d in args.depths.split(",") if d.strip())
        if args.task != "synthetic" and args.data is None:
            raise ValueError(f"--task {args.task} needs --data (a HotpotQA dev-distractor JSON for ruler-hqa, a "
                             "haystack file or folder for niah); nothing is downloaded")
        if args.data is not None and not os.path.exists(args.data):
            raise FileNotFoundError(f"--data {args.data}: no such file or folder")
        compressor, engine, gate, settings = _lychee_setup(args, "memcomp eval")
        try:
            cfg = HarnessConfig(systems=systems, generation=settings, block_tokens=args.block_tokens,
                                chunk_tokens=args.chunk_tokens, gate_mode=args.gate_mode, batch_size=args.batch_size,
                                store_dir=args.store_dir)
            items = load_items(args.task, compressor.tokenizer, lengths, data=args.data,
                               num_questions=args.num_questions, depths=depths, hops=args.hops, seed=args.data_seed)
            report = run_eval(compressor, engine, items, cfg, gate=gate,
                              progress=False if args.no_progress else None, task=args.task)
        finally:
            _close(engine)
    except _user_errors() as exc:
        print(f"memcomp eval: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_table(report))
    ours = "lychee" if "lychee" in systems else "lychee-nogate"
    for row in ratios(report, ours, "memagent"):
        peak = "n/a" if row["peak_memory_ratio"] is None else f"{row['peak_memory_ratio']:.2f}x"
        print(f"length {row['length']}, MemAgent / {ours}: time per question {row['speedup']:.2f}x, positions "
              f"prefilled {row['prefill_ratio']:.2f}x, peak memory {peak} (above 1: {ours} costs less)")
    for kind, path in write_report(report, args.out).items():
        print(f"wrote {kind}: {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from memcomp.serving.service import main as serve_main

    return serve_main(args.args)


def _info(_: argparse.Namespace) -> int:
    import platform

    import torch

    from memcomp import __version__
    from memcomp._compat import transformers_version_problem
    from memcomp.kernels.backend import current_backend, interpreter_enabled, triton_available

    print(f"memcomp {__version__}, python {platform.python_version()}, torch {torch.__version__}")
    print(f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    print(f"triton: {'installed' if triton_available() else 'missing'} (interpreter: {interpreter_enabled()})")
    print(f"backend: {current_backend()}")
    import transformers

    print(f"transformers: {transformers.__version__} ({transformers_version_problem() or 'in the tested range'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from memcomp import __version__

    parser = argparse.ArgumentParser(prog="memcomp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"memcomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny compressor on CPU and show that memory carries the text")
    demo.add_argument("--preset", default="tiny", help="tiny (default, ~10 min on 2 cores), smollm2 (the real "
                      "SmolLM2-135M-Instruct, one GPU, under 10 min), small (GPU), smoke")
    demo.add_argument("--stage", default="cpt", choices=("cpt", "sft", "rl", "lychee"),
                      help="cpt (default): CPT + reconstruction eval; sft: continue with SFT on synthetic QA; rl: "
                      "continue with DAPO on the same QA, held-out accuracy after RL vs after SFT")
    demo.add_argument("overrides", nargs="*", help="key=value: any trainer option (steps=2000, device=cuda, "
                      "out_dir=...), eval_passages=N (cpt) or eval_questions=N (sft, rl; 0 = all)")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="benchmarks outside pytest")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    ttft = bench_sub.add_parser("ttft", help="time to first token and peak memory, full context vs memory")
    # Defaults that depend on CUDA are resolved after parsing (_ttft_defaults): --help never imports torch.
    ttft.add_argument("--model-config", default=None,
                      help="qwen2.5-7b, qwen2.5-32b or tiny (random weights of the real shapes), or a real model "
                      "(smollm2-135m-instruct); default qwen2.5-7b with CUDA, tiny without")
    ttft.add_argument("--lengths", default=None,
                      help="context lengths, e.g. 4k,8k,120k; default 4k,8k,16k,32k,64k,120k with CUDA, 256,1k without")
    ttft.add_argument("--chunk-size", type=int, default=16)
    ttft.add_argument("--question-tokens", type=int, default=32)
    ttft.add_argument("--warmup", type=int, default=3, help="warm-up runs per case (paper: 3)")
    ttft.add_argument("--runs", type=int, default=20, help="timed runs per case (paper: 20)")
    ttft.add_argument("--device", default=None, help="default cuda when available, else cpu")
    ttft.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    ttft.add_argument("--no-end-to-end", action="store_true", help="skip the encode + prefill case")
    ttft.add_argument("--out", default=os.path.join("runs", "ttft"),
                      help="folder for the JSON, Markdown table and PNG (default runs/ttft under the current folder)")
    ttft.set_defaults(func=_bench_ttft)
    ask_p = sub.add_parser("ask", help="answer a question about a long text file with LycheeMemory",
                           description="Answer a question about a long text file with LycheeMemory: the file is "
                           "encoded once into a block store (next to it, in <input>.memcomp/, or under --cache-dir / "
                           "$MEMCOMP_STORE_CACHE) and reused by every later question with the same compressor.")
    ask_p.add_argument("--input", required=True, help="the text file (UTF-8)")
    ask_p.add_argument("--question", required=True)
    ask_p.add_argument("--store", default=None, help="block store folder (default: keyed by input and compressor)")
    ask_p.add_argument("--cache-dir", default=None, help="folder for block stores instead of next to the input")
    _lychee_options(ask_p)
    ask_p.set_defaults(func=_ask)
    ev = sub.add_parser("eval", help="LycheeMemory, MemAgent and full context side by side on a benchmark")
    ev.add_argument("--task", required=True, choices=("synthetic", "ruler-hqa", "niah"))
    ev.add_argument("--systems", default="lychee,lychee-nogate,memagent,full",
                    help="comma-separated subset of lychee,lychee-nogate,memagent,full (lychee needs --gate)")
    ev.add_argument("--lengths", required=True, help="tokens (synthetic, niah; 4k = 4096) or documents per question "
                    "(ruler-hqa: 50,100,...,12800)")
    ev.add_argument("--data", default=None, help="ruler-hqa: HotpotQA dev-distractor JSON; niah: haystack file or "
                    "folder; synthetic: optional text file of distractor paragraphs (default: stdlib docstrings)")
    ev.add_argument("--num-questions", type=int, default=8, help="questions per length (not niah; default 8)")
    ev.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="niah needle depths in [0, 1]")
    ev.add_argument("--hops", type=int, default=2, choices=(1, 2), help="synthetic task hops (default 2)")
    ev.add_argument("--data-seed", type=int, default=0, help="synthetic task seed (default 0)")
    ev.add_argument("--chunk-tokens", type=int, default=5000, help="MemAgent chunk size (default 5000)")
    ev.add_argument("--batch-size", type=int, default=1, help="questions per call (default 1)")
    ev.add_argument("--store-dir", default=None, help="keep block stores here for reuse (default: temporary)")
    ev.add_argument("--out", default=os.path.join("runs", "eval"), help="folder for eval.json, eval.md, eval.png")
    _lychee_options(ev)
    ev.set_defaults(func=_eval)
    serve = sub.add_parser("serve", add_help=False, help="HTTP service: encode documents into memories and "
                           "generate from them (vLLM; `memcomp serve --help` for its options)")
    serve.add_argument("args", nargs=argparse.REMAINDER)
    serve.set_defaults(func=_serve)
    info = sub.add_parser("info", help="versions, devices, backend")
    info.set_defaults(func=_info)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # its own parser takes every option, --help included (REMAINDER cannot start with one)
        return _serve(argparse.Namespace(args=argv[1:]))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
