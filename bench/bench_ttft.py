"""Time to first token and peak memory, full context against compressed memory (the paper's Table 7) --
memcomp.ttft under pytest (`pytest bench/ --benchmark -k ttft`). On a GPU: Qwen2.5-7B shapes at 4K-120K with
the paper's 3 warm-ups and 20 runs (`--bench-warmup` / `--bench-runs` replace them). On a CPU: the tiny config,
256 and 1K tokens. Targets (H200): per-embedding speed-up >= 13.3x and memory saving >= 2.0x at 120K; memory
path <= 1.1x a plain prefill of as many positions; end-to-end faster than full context at 120K.

Every case of a length is timed inside that length's row (full context is the baseline of the memory paths),
so the speed-ups need nothing from another test."""

import os

from benchutil import DEVICE, HAS_CUDA, RESULTS_DIR, metadata

from memcomp.ttft import TTFTConfig, format_table, run_ttft, write_outputs

COLUMNS: list = []
WARMUP, RUNS = (3, 20) if HAS_CUDA else (1, 2)


def test_ttft(bench, request):
    warmup, runs = bench.counts(WARMUP, RUNS)
    cfg = TTFTConfig(
        model_config="qwen2.5-7b" if HAS_CUDA else "tiny",
        lengths=(4096, 8192, 16384, 32768, 65536, 122880) if HAS_CUDA else (256, 1024),
        warmup=warmup, runs=runs, device=DEVICE, dtype="bfloat16" if HAS_CUDA else "float32", out_dir=RESULTS_DIR)
    write = HAS_CUDA or bool(os.environ.get("MEMCOMP_RESULTS_DIR"))
    # Written after each length as well, so a run stopped by a time limit keeps the lengths it finished.
    result = run_ttft(cfg, log=lambda _: None,
                      on_row=(lambda partial: write_outputs(partial, cfg.out_dir, with_plot=False)) if write else None)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nttft -- {metadata()['mode']}\n" + format_table(result))
        if write:
            print(write_outputs(result, cfg.out_dir))
    for r in result["rows"]:  # the counts asked for are the counts that ran, for every case that fitted
        for case in ("full", "per_embedding", "per_block", "plain_same_positions", "end_to_end"):
            t = r[case]
            assert t.get("oom") or (t["runs"] == runs and len(t["runs_ms"]) == runs), (r["context"], case)
