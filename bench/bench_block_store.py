"""LycheeMemory block store build (memcomp.lychee.store): peak host memory against input length, and build
throughput. Issue 12's streaming target: building a store of 1.75M tokens with a tiny model on CPU peaks within
10 % of the RSS of building one of 100K (`pytest bench/ --benchmark -k block_store`).

Each size runs in a fresh child process (memcomp.lychee.store_rss.measure_build_rss: a synthetic corpus file, the
"tiny" Qwen2 shape at C = 4, 4,096-token blocks, 64 blocks per shard) that reports its own peak RSS
(``ru_maxrss``) before and after the build; the smallest size is the baseline of the same case. The build runs on
the CPU on every machine: what is measured is host memory, so the case is the same with or without a GPU. One
build per size: peak RSS is a maximum, not a time to average, so --bench-warmup / --bench-runs do not apply."""

from memcomp.lychee.store_rss import measure_build_rss

COLUMNS = ["tokens", "blocks", "seconds", "tokens_per_s", "setup_rss_MB", "peak_rss_MB", "build_rss_MB",
           "peak_vs_smallest"]
SIZES = (100_000, 1_750_000)
TARGET = 1.10  # peak RSS at the largest size over the smallest's


def test_block_store_streaming_rss(bench, tmp_path):
    results = [measure_build_rss(n, str(tmp_path)) for n in SIZES]
    base = results[0]["peak_rss_mb"]
    for r in results:
        bench.add({"tokens": r["num_tokens"], "blocks": r["num_blocks"], "seconds": r["seconds"],
                   "tokens_per_s": r["tokens_per_s"], "setup_rss_MB": r["setup_rss_mb"],
                   "peak_rss_MB": r["peak_rss_mb"], "build_rss_MB": r["build_rss_mb"],
                   "peak_vs_smallest": r["peak_rss_mb"] / base})
    ratio = results[-1]["peak_rss_mb"] / base
    assert ratio <= TARGET, (f"peak RSS building {results[-1]['num_tokens']} tokens is {ratio:.3f}x that of "
                             f"{results[0]['num_tokens']} tokens (target <= {TARGET}x): the build does not stream")
