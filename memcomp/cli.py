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
    info = sub.add_parser("info", help="versions, devices, backend")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
