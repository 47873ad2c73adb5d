"""Serving on vLLM: time to first token and throughput of ``memcomp.serving.VLLMEngine`` reading compressed memory,
against vLLM on the full context, with the HF engine (``memcomp.rl.engine.HFEngine``) beside both
(`pytest bench/ --benchmark -k serving`). Skipped where vLLM is not installed (scripts/setup_serving.sh builds the
serving environment on a CPU).

Inputs are the TTFT suite's (bench_ttft.py, memcomp.ttft): random-token contexts of the same lengths, the same
32-token random question, chunk size 16; here on a real model, MEMCOMP_BENCH_MODEL (default
smollm2-135m-instruct, random memory projection: its answers mean nothing, its costs are the real model's).
Lengths: 256 and 1K on a CPU, 4K and 8K on a GPU (a length that does not fit the model's window with the question
and the new tokens gets a row that says so: SmolLM2's window is 8K; MEMCOMP_BENCH_SERVING_LENGTHS, comma-separated
tokens, replaces them). Per length and system:

* ``vllm-memory``: the vLLM engine on prompt embeddings (per-embedding wrappers, 3 n + 32 positions; the memory
  encoded beforehand, not timed: the paper's precomputed-memory setting);
* ``vllm-full``: the same vLLM engine on the context's token ids (L + 32 positions), vLLM's ordinary path: the
  baseline every speed-up is over;
* ``hf-memory`` / ``hf-full``: the same two prompts through HF ``generate``.

``ttft_ms``: one request, one greedy token (prefill and the first token, as a client waits for it), median and
p20/p80 of the timed runs. ``req_per_s`` / ``gen_tok_per_s``: ``requests`` requests (each its own context of that
length, same question) submitted at once, greedy, up to ``new_tokens`` tokens each (stopped at EOS), divided by the
median wall time of the batch. ``prefilled``: positions prefilled per request; ``same_as_hf``: the batch's greedy
tokens equal the HF engine's for the same prompts (vLLM and HF sum in different orders, so a near-tie can flip a
token; the parity tests hold the engines to it at small shapes). Prefix caching is off, so repeated runs of one
prompt are not served from cache. Peak memory: the vLLM engine allocates its KV cache once (``kv_cache_MB``, sized for
the batch at the longest length); the process peak of vLLM's engine process is not measured here.

On a CPU vLLM's engine runs in its own process with its own threads: the two engines get different thread counts,
and a loaded machine slows them unevenly; compare within one run, on a quiet machine."""

import os

import pytest
import torch
from benchutil import DEVICE, HAS_CUDA, metadata

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup_serving.sh builds the serving environment)")

COLUMNS = ["system", "tokens", "prefilled", "ttft_ms", "ttft_p20", "ttft_p80", "ttft_speedup", "requests",
           "new_tokens", "generated", "req_per_s", "gen_tok_per_s", "throughput_speedup", "same_as_hf"]
QUESTION_TOKENS, CHUNK = 32, 16  # as the TTFT suite
CPU_LENGTHS, GPU_LENGTHS = (256, 1024), (4096, 8192)
REQUESTS, NEW_TOKENS = (64, 128) if HAS_CUDA else (4, 16)
# On a CPU the batch gets no warm-up of its own: the TTFT cases just ran every system on the same prompts, and a
# batch call there takes up to ~30 s (HF, full context, 1K), which a warm-up would add to a ~5-minute bench.
TTFT_COUNTS, BATCH_COUNTS = ((3, 20), (1, 5)) if HAS_CUDA else ((1, 3), (0, 2))
SYSTEMS = ("vllm-memory", "vllm-full", "hf-memory", "hf-full")


def _lengths():
    env = os.environ.get("MEMCOMP_BENCH_SERVING_LENGTHS")
    if env:
        return tuple(int(x) for x in env.split(",") if x.strip())
    return GPU_LENGTHS if HAS_CUDA else CPU_LENGTHS


@pytest.fixture(scope="module")
def engines():
    """(compressor, VLLMEngine, HFEngine, {vllm version, KV cache MB}) on the bench model; vLLM starts once."""
    import vllm

    from memcomp import CompressorConfig, MemoryCompressor
    from memcomp.models import load_pretrained
    from memcomp.rl.engine import HFEngine
    from memcomp.serving import VLLMEngine, kv_cache_bytes

    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    model, tok = load_pretrained(os.environ.get("MEMCOMP_BENCH_MODEL", "smollm2-135m-instruct"), device=DEVICE,
                                 dtype=dtype)
    comp = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=CHUNK, progress=False))
    comp.eval()
    window = model.config.max_position_embeddings
    fits = [n for n in _lengths() if n + QUESTION_TOKENS + NEW_TOKENS <= window]
    if not fits:
        pytest.skip(f"no length of {_lengths()} fits the model's window of {window} positions with the question and "
                    f"{NEW_TOKENS} new tokens")
    longest = max(fits) + QUESTION_TOKENS + NEW_TOKENS
    kwargs = {} if HAS_CUDA else {"enforce_eager": True}  # no torch.compile start-up on a CPU
    engine = VLLMEngine(comp, max_model_len=longest, kv_cache_memory_bytes=kv_cache_bytes(comp, REQUESTS, longest),
                        max_num_seqs=REQUESTS, enable_prefix_caching=False, **kwargs)
    info = {"vllm": vllm.__version__, "kv_cache_MB": kv_cache_bytes(comp, REQUESTS, longest) / 2**20,
            "window": window, "fits": fits}
    yield comp, engine, HFEngine(comp), info
    engine.close()


def _prompts(comp, length, n):
    """``n`` contexts of ``length`` random tokens and the question, drawn as memcomp.ttft draws them (the same
    generator seed, question first): the first context is the TTFT suite's at its first length."""
    vocab = comp.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    question = torch.randint(1, vocab - 2, (QUESTION_TOKENS,), generator=gen)
    contexts = [torch.randint(1, vocab - 2, (length,), generator=gen) for _ in range(n)]
    return question, contexts


def _requests(comp, question, contexts, system):
    from memcomp.rl.engine import GenerationRequest

    if system.endswith("memory"):
        memories = comp.encode(contexts)  # precomputed: not timed
        return [GenerationRequest(m, question) for m in memories]
    return [GenerationRequest(None, torch.cat([c, question])) for c in contexts]


def _runner(engine, hf, system, requests, options):
    """The callable to time: one engine call on ``requests``; it keeps the last results in ``out``."""
    out = {}
    if system == "vllm-full":  # vLLM's own path: token ids, no prompt embeddings
        ids = [{"prompt_token_ids": torch.as_tensor(r.prompt).tolist()} for r in requests]
        params = engine.sampling_params(options)

        def run():
            res = engine.llm.generate(ids, params, use_tqdm=False)
            out["tokens"] = [list(o.outputs[0].token_ids) for o in res]
    else:
        target = engine if system == "vllm-memory" else hf

        def run():
            out["tokens"] = [r[0].token_ids for r in target.generate(requests, options)]
    return run, out


def test_serving(bench, request, engines):
    from memcomp.rl.engine import SamplingOptions

    comp, engine, hf, info = engines
    first = SamplingOptions(temperature=0, max_new_tokens=1)
    batch = SamplingOptions(temperature=0, max_new_tokens=NEW_TOKENS)
    ttft_w, ttft_r = TTFT_COUNTS
    batch_w, batch_r = BATCH_COUNTS
    for length in _lengths():
        if length not in info["fits"]:  # e.g. SmolLM2's 8K window at the GPU's 8K length: a row that says so
            bench.add({"system": "all", "tokens": length, "unavailable": f"{length} + {QUESTION_TOKENS} + "
                       f"{NEW_TOKENS} positions exceed the model's window of {info['window']}"})
            continue
        question, contexts = _prompts(comp, length, REQUESTS)
        reqs = {s: _requests(comp, question, contexts, s) for s in SYSTEMS}
        n = -(-length // CHUNK)
        prefilled = {"vllm-memory": 3 * n + QUESTION_TOKENS, "hf-memory": 3 * n + QUESTION_TOKENS,
                     "vllm-full": length + QUESTION_TOKENS, "hf-full": length + QUESTION_TOKENS}
        single = {s: _runner(engine, hf, s, reqs[s][:1], first) for s in SYSTEMS}
        ttft = bench.compare({s: (lambda run=single[s][0]: run) for s in SYSTEMS}, warmup=ttft_w, runs=ttft_r,
                             baselines=["vllm-full"], sync_each=True)
        many = {s: _runner(engine, hf, s, reqs[s], batch) for s in SYSTEMS}
        thr = bench.compare({s: (lambda run=many[s][0]: run) for s in SYSTEMS}, warmup=batch_w, runs=batch_r,
                            baselines=["vllm-full"], sync_each=True)
        for s in SYSTEMS:
            t, b, tokens = ttft[s], thr[s], many[s][1]["tokens"]
            generated = sum(len(x) for x in tokens)
            seconds = b["median_ms"] / 1e3
            ref = many["hf-memory" if s.endswith("memory") else "hf-full"][1]["tokens"]
            bench.add({"system": s, "tokens": length, "prefilled": prefilled[s], "ttft_ms": t["median_ms"],
                       "ttft_p20": t["p20_ms"], "ttft_p80": t["p80_ms"], "ttft_speedup": t["speedup_vs_vllm-full"],
                       "requests": REQUESTS, "new_tokens": NEW_TOKENS, "generated": generated,
                       "req_per_s": REQUESTS / seconds, "gen_tok_per_s": generated / seconds,
                       "throughput_speedup": b["speedup_vs_vllm-full"], "same_as_hf": tokens == ref,
                       "runs": t["runs"], "batch_runs": b["runs"], "ttft_runs_ms": t["runs_ms"],
                       "batch_runs_ms": b["runs_ms"], "vllm": info["vllm"], "kv_cache_MB": info["kv_cache_MB"],
                       "model": os.environ.get("MEMCOMP_BENCH_MODEL", "smollm2-135m-instruct"),
                       "dtype": str(comp.dtype).removeprefix("torch.")})
            # The counts asked for are the counts that ran, and every batch request produced tokens.
            assert t["runs"] == ttft_r and b["runs"] == batch_r and len(tokens) == REQUESTS and generated >= REQUESTS
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nserving -- {metadata()['mode']}; vLLM {info['vllm']}, KV cache {info['kv_cache_MB']:.0f} MB")
