"""``memcomp`` command line: ``memcomp demo [--preset P] [key=value ...]``, ``memcomp info``."""

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
        print("memcomp demo: device=cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.stage == "sft" and not os.path.isdir(cfg.compressor.init_from):
        print(f"memcomp demo --stage sft continues from the CPT demo: {cfg.compressor.init_from} not found; run "
              "`memcomp demo` first (or pass init_from=...)", file=sys.stderr)
        return 2
    s = run(args.preset, args.stage, args.overrides)
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
    print(f"  wrote {s['out_dir']}/summary.json, loss.png, compressor/, metrics.jsonl, checkpoints")
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
    print(f"transformers: {transformers_version_problem() or 'in the tested range'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from memcomp import __version__

    parser = argparse.ArgumentParser(prog="memcomp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"memcomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny compressor on CPU and show that memory carries the text")
    demo.add_argument("--preset", default="tiny", help="tiny (default, ~10 min on 2 cores), smollm2 (the real "
                      "SmolLM2-135M-Instruct, one GPU, under 10 min), small (GPU), smoke")
    demo.add_argument("--stage", default="cpt", choices=("cpt", "sft"),
                      help="cpt (default): CPT + reconstruction eval; sft: continue with SFT on synthetic QA")
    demo.add_argument("overrides", nargs="*", help="key=value: any trainer option (steps=2000, device=cuda, "
                      "out_dir=...), eval_passages=N (cpt) or eval_questions=N (sft, 0 = all)")
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
    info = sub.add_parser("info", help="versions, devices, backend")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
