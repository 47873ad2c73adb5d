"""``memcomp`` command line: ``memcomp demo [--preset P] [key=value ...]``, ``memcomp info``."""

from __future__ import annotations

import argparse
import json
import sys


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"memcomp: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def _demo(args: argparse.Namespace) -> int:
    import torch

    from memcomp.demo.run import make_config, run

    try:
        cfg = make_config(args.preset, **_parse_overrides(args.overrides))
    except (ValueError, TypeError) as exc:
        print(f"memcomp demo: {exc}", file=sys.stderr)
        return 2
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        print("memcomp demo: device=cuda but CUDA is not available", file=sys.stderr)
        return 2
    summary = run(cfg)
    ev = summary["eval"]
    print(f"\nmemcomp demo ({cfg.preset}, {summary['compression']}, {summary['parameters'] / 1e6:.1f}M params, "
          f"{summary['total_seconds'] / 60:.1f} min)")
    print(f"  final training loss           {summary['final_loss']:.3f} "
          f"(reconstruction {summary['final_reconstruction_loss']:.3f})")
    print("  held-out reconstruction        right memory   control (another passage's memory)")
    print(f"  greedy token accuracy         {ev['memory_token_accuracy']:>10.3f}   {ev['control_token_accuracy']:.3f}")
    print(f"  ROUGE-L F1                    {ev['memory_rouge_l']:>10.3f}   {ev['control_rouge_l']:.3f}")
    print(f"  teacher-forced accuracy       {ev['memory_teacher_forced_accuracy']:>10.3f}   "
          f"{ev['control_teacher_forced_accuracy']:.3f}")
    verdict = "yes" if summary["memory_carries_information"] else "NO"
    print(f"  memory carries information (both accuracies >= 2x control): {verdict} "
          f"(greedy {summary['memory_vs_control_accuracy_ratio']:.1f}x, "
          f"teacher-forced {summary['memory_vs_control_teacher_forced_ratio']:.1f}x)")
    print(f"  wrote {cfg.out_dir}/summary.json, loss.png, compressor/")
    return 0


def _bench_ttft(args: argparse.Namespace) -> int:
    from memcomp.ttft import TTFTConfig, format_table, parse_lengths, run_ttft, write_outputs

    try:
        cfg = TTFTConfig(model_config=args.model_config, lengths=parse_lengths(args.lengths),
                         chunk_size=args.chunk_size, question_tokens=args.question_tokens, warmup=args.warmup,
                         runs=args.runs, device=args.device, dtype=args.dtype, end_to_end=not args.no_end_to_end,
                         out_dir=args.out)
        from memcomp.model_configs import MODEL_CONFIGS

        if cfg.model_config not in MODEL_CONFIGS:
            raise ValueError(f"unknown model config {cfg.model_config!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    except ValueError as exc:
        print(f"memcomp bench ttft: {exc}", file=sys.stderr)
        return 2
    result = run_ttft(cfg)
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
    parser = argparse.ArgumentParser(prog="memcomp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny compressor on CPU and show that memory carries the text")
    demo.add_argument("--preset", default="tiny", help="tiny (default, ~10 min on 2 cores), small (GPU), smoke")
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=2000 device=cuda")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="benchmarks outside pytest")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    ttft = bench_sub.add_parser("ttft", help="time to first token and peak memory, full context vs memory")
    import torch as _torch

    cuda = _torch.cuda.is_available()
    ttft.add_argument("--model-config", default="qwen2.5-7b" if cuda else "tiny",
                      help="qwen2.5-7b, qwen2.5-32b or tiny (random weights of the real shapes)")
    ttft.add_argument("--lengths", default="4k,8k,16k,32k,64k,120k" if cuda else "256,1k",
                      help="context lengths, e.g. 4k,8k,120k")
    ttft.add_argument("--chunk-size", type=int, default=16)
    ttft.add_argument("--question-tokens", type=int, default=32)
    ttft.add_argument("--warmup", type=int, default=3, help="warm-up runs per case (paper: 3)")
    ttft.add_argument("--runs", type=int, default=20, help="timed runs per case (paper: 20)")
    ttft.add_argument("--device", default="cuda" if cuda else "cpu")
    ttft.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    ttft.add_argument("--no-end-to-end", action="store_true", help="skip the encode + prefill case")
    ttft.add_argument("--out", default="bench/results", help="folder for the JSON, Markdown table and PNG")
    ttft.set_defaults(func=_bench_ttft)
    info = sub.add_parser("info", help="versions, devices, backend")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
