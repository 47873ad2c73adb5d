"""memcomp.lychee.traces: the reasoner's SFT records, and the proof that each one is laid out exactly as the call
the system makes at inference (the same prefix, memory block tokens, prompt ids and stop token)."""

import json

import pytest
import torch
from lychee_testutil import DISTRACTORS, ScriptedEngine, memory_slot

from memcomp.data import DataError, JsonlReader, SampleStream
from memcomp.eval.synthetic import NO_MEMORY, SyntheticConfig, example_blocks, generate_example, memory_trace
from memcomp.lychee.baselines import FullContext, FullContextConfig, MemAgent, MemAgentConfig
from memcomp.lychee.prompts import Prompts
from memcomp.lychee.reasoner import GenerationSettings, LycheeReasoner, ReasonerConfig
from memcomp.lychee.store import BlockStore, BlockStoreConfig
from memcomp.lychee.traces import TraceConfig, check_trace_record, trace_records, trace_sample, turn_end_ids
from memcomp.packing import PackingCollator
from memcomp.tasks import SampleBuilder

B = 16
WINDOW = 4096  # the scripted engine runs no model: the tiny model's 512 positions do not bound these prompts
SETTINGS = GenerationSettings(memory_tokens=64, answer_tokens=16, temperature=0, top_p=1.0)


def example(tok, seed=3, hops=2):
    return generate_example(DISTRACTORS, SyntheticConfig(hops=hops, num_distractors=6, num_confusers=1), seed=seed,
                            tokenizer=tok)


def test_records_follow_the_ideal_trace(base_tokenizer):
    tok = base_tokenizer
    ex = example(tok)
    blocks = example_blocks(ex, tok, B)
    trace = memory_trace(ex, blocks, list(range(blocks.num_blocks)))
    recs = trace_records([ex], tok, TraceConfig(block_tokens=B, chunk_tokens=B, unrelated_steps=1), seed=0)
    lychee = [r for r in recs if r["kind"] == "lychee_update"]
    changed = [s for s in range(blocks.num_blocks) if trace.memories[s] != ([NO_MEMORY] + list(trace.memories))[s]]
    assert 1 <= len(changed) <= 2 and len(lychee) == len(changed) + 1  # every evidence step, one unrelated step
    by_section = {tuple(blocks.block_ids(s)): s for s in range(blocks.num_blocks)}
    for r in lychee:
        s = by_section[tuple(r["section_ids"])]
        assert r["target"] == trace.memories[s] and r["memory"] == ([NO_MEMORY] + list(trace.memories))[s]
    final = next(r for r in recs if r["kind"] == "final_answer")
    assert final["memory"] == trace.memories[-1] == " ".join(ex.facts) and final["target"] == f"\\boxed{{{ex.answer}}}"
    full = next(r for r in recs if r["kind"] == "full_context")
    assert full["section_ids"] == list(tok(ex.context, add_special_tokens=False)["input_ids"])
    # Deterministic per seed; the kinds filter holds.
    assert trace_records([ex], tok, TraceConfig(block_tokens=B, chunk_tokens=B, unrelated_steps=1), seed=0) == recs
    only = trace_records([ex], tok, TraceConfig(block_tokens=B, chunk_tokens=B, kinds=("final_answer",)))
    assert [r["kind"] for r in only] == ["final_answer"]


def _ideal_respond(trace_memories):
    """A scripted reasoner that writes the ideal memory of each update in call order, then answers from it."""
    step = iter(trace_memories)

    def respond(request, text, options):
        if "<section>" in text or request.memory is not None:
            return next(step)
        return "\\boxed{" + memory_slot(text) + "}"
    return respond


def test_samples_are_the_calls_the_systems_make(make_compressor, tmp_path):
    """Every record of every kind, as ``trace_sample`` lays it out for training, equals the request LycheeMemory
    (over a block store), MemAgent or full context sends the engine at that step when the model writes the ideal
    memory: prefix, block tokens, prompt ids; and the target ends on the token the engines stop on."""
    comp = make_compressor()
    tok = comp.tokenizer
    ex = example(tok)
    recs = trace_records([ex], tok, TraceConfig(block_tokens=B, chunk_tokens=B, unrelated_steps=10 ** 6))
    prompts, end = Prompts(tok), turn_end_ids(tok)
    samples = {k: [trace_sample(r, prompts, end) for r in recs if r["kind"] == k]
               for k in ("lychee_update", "memagent_update", "final_answer", "full_context")}
    blocks = example_blocks(ex, tok, B)
    memories = memory_trace(ex, blocks, list(range(blocks.num_blocks))).memories
    assert len(samples["lychee_update"]) == blocks.num_blocks  # every step kept (unrelated_steps is large)

    store = BlockStore.build(comp, ex.context, tmp_path / "s", BlockStoreConfig(block_tokens=B), progress=False)
    engine = ScriptedEngine(tok, _ideal_respond(memories))
    reasoner = LycheeReasoner(comp, engine, config=ReasonerConfig(generation=SETTINGS, window=WINDOW))
    (res,) = reasoner.answer([ex.question], [store])
    updates = [req for reqs, _ in engine.calls for req in reqs if req.memory is not None]
    assert len(updates) == len(store) == blocks.num_blocks
    for k, (req, s) in enumerate(zip(updates, samples["lychee_update"])):
        assert list(req.prefix) == s.before and list(req.prompt) == s.after
        assert store.token_ids(k).tolist() == s.context
        # The trainer's forward encodes the sample's context chunk by chunk: the block the store serves.
        torch.testing.assert_close(comp.encode(s.context).embeddings, store[k].embeddings if hasattr(
            store[k], "embeddings") else store[k])
    final_req = [req for reqs, _ in engine.calls for req in reqs if req.memory is None]
    assert [list(r.prompt) for r in final_req] == [samples["final_answer"][0].after]
    assert res.steps[-1].memory == memories[-1] == " ".join(ex.facts)  # the loop carried the ideal memory through

    chunks = example_blocks(ex, tok, B)
    engine = ScriptedEngine(tok, _ideal_respond(memory_trace(ex, chunks, list(range(chunks.num_blocks))).memories))
    memagent = MemAgent(comp, engine, MemAgentConfig(generation=SETTINGS, chunk_tokens=B, window=WINDOW))
    memagent.answer([ex.question], [ex.context])
    reqs = [req for rs, _ in engine.calls for req in rs]
    assert [list(r.prompt) for r in reqs[:-1]] == [s.after for s in samples["memagent_update"]]
    assert list(reqs[-1].prompt) == samples["final_answer"][0].after
    assert all(s.context == [] and s.before == [] for s in samples["memagent_update"])

    engine = ScriptedEngine(tok, lambda r, t, o: "\\boxed{x}")
    FullContext(comp, engine, FullContextConfig(generation=SETTINGS, window=WINDOW)).answer([ex.question], [ex.context])
    assert list(engine.calls[0][0][0].prompt) == samples["full_context"][0].after

    for kind, ss in samples.items():
        for s in ss:
            assert s.target[-len(end):] == end and s.has_memory == (kind == "lychee_update")
    assert end == [tok.eos_token_id]  # this tokenizer has no <|im_end|> token: the engines stop on EOS


def test_turn_end_ids(base_tokenizer, smollm2_loaded):
    assert turn_end_ids(base_tokenizer) == [base_tokenizer.eos_token_id]
    tok = smollm2_loaded[1]
    assert turn_end_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]

    class NoEnd:
        eos_token_id = None
        unk_token_id = 0

        def convert_tokens_to_ids(self, t):
            return 0
    with pytest.raises(ValueError, match="neither"):
        turn_end_ids(NoEnd())


@pytest.mark.parametrize("rec, why", [
    ({"kind": "plan", "problem": "q", "target": "t"}, "kind must be one of"),
    ({"kind": "final_answer", "problem": "q", "target": "t"}, "'memory'"),
    ({"kind": "lychee_update", "problem": "q", "target": "t", "memory": "m"}, "section_ids"),
    ({"kind": "lychee_update", "problem": "q", "target": "t", "memory": "m", "section_ids": [1, -2]}, "section_ids"),
    ({"kind": "full_context", "problem": "q", "target": "t", "section_ids": ["a"]}, "section_ids"),
    ({"kind": "full_context", "problem": " ", "target": "t", "section_ids": [1]}, "'problem'"),
    ([1, 2], "JSON object"),
])
def test_bad_records_are_named(rec, why, base_tokenizer):
    assert why in check_trace_record(rec)
    with pytest.raises(ValueError, match="trace record"):
        trace_sample(rec, Prompts(base_tokenizer), [0])


def test_stream_reads_trace_files_and_counts_malformed_lines(make_compressor, tmp_path):
    """The ``reasoner`` mixture streams a trace file into samples the packed forward trains on (loss on exactly the
    targets); malformed lines are counted and, past the bound, fail the run naming the first faults."""
    comp = make_compressor()
    tok = comp.tokenizer
    recs = trace_records([example(tok, seed=s, hops=1) for s in range(3)], tok,
                         TraceConfig(block_tokens=B, chunk_tokens=B))
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "lychee_update", "problem": "q", '
                    '"target": "t", "memory": "m"}\n')
    from memcomp.data import MIXTURES

    reader = JsonlReader(str(path), "trace", max_bad_fraction=0.5, shuffle=False)
    stream = SampleStream(SampleBuilder(tok, "chatml", chunk_size=4), MIXTURES["reasoner"], {"trace": reader}, seed=0)
    got = stream.take(len(recs) + 1)
    assert reader.bad == 1 and "section_ids" in reader.bad_examples[0]
    assert [s.task for s in got[:len(recs)]] == [r["kind"] for r in recs]
    batches = PackingCollator.from_compressor(comp, 4096)(got)
    assert sum(len(b.sample_index) for b in batches) == len(got)
    n = sum(comp.forward_packed(b).num_target_tokens for b in batches)
    assert n == sum(len(s.target) for s in got)
    strict = JsonlReader(str(path), "trace", max_bad_fraction=0.0, shuffle=False)
    path.write_text("".join('{"kind": "x", "problem": "q", "target": "t"}\n' for _ in range(25)))
    with pytest.raises(DataError, match="kind must be one of"):
        list(zip(range(25), strict))
