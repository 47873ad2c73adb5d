"""The LycheeMemory reasoner on ``memcomp.serving.VLLMEngine``: over a block store, the same greedy trace (every
working-memory update, in order) and answers as on ``HFEngine``, for several questions batched together; and
``memcomp ask --engine vllm`` answering as ``--engine hf`` does, with a clear error (exit 2) where vLLM is absent.

The vLLM cases need the serving environment (scripts/setup_serving.sh); the error case runs where vLLM is not
installed."""

import copy

import pytest
import torch
from testutil import TEXTS

from memcomp import CompressorConfig, MemoryCompressor
from memcomp.cli import main
from memcomp.lychee.reasoner import GenerationSettings, LycheeReasoner, ReasonerConfig
from memcomp.lychee.store import BlockStore, BlockStoreConfig
from memcomp.rl.engine import HFEngine
from memcomp.serving import vllm_available

needs_vllm = pytest.mark.skipif(
    not vllm_available(), reason="vLLM is not installed (scripts/setup_serving.sh builds the serving environment)")

QUESTIONS = ["Where was Tom born?", "Which file opens the stream?", "What does the sort order use?"]
FAST = ["--block-tokens", "16", "--memory-tokens", "6", "--answer-tokens", "6", "--temperature", "0",
        "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(base_tokenizer):
    """A tiny random Qwen2 compressor with tied embeddings (as SmolLM2's). Head width 64: vLLM's CPU attention takes
    a fixed set of head sizes."""
    import transformers

    tok = copy.deepcopy(base_tokenizer)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=256, max_position_embeddings=512,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   tie_word_embeddings=True)
    comp = MemoryCompressor.from_base(transformers.Qwen2ForCausalLM(cfg).eval(), tok, CompressorConfig(chunk_size=4))
    with torch.no_grad():
        comp.projection.weight.add_(0.05 * torch.randn_like(comp.projection.weight))
    return comp


@needs_vllm
def test_reasoner_on_vllm_reads_and_answers_as_on_hf(tiny, tmp_path):
    from memcomp.serving import VLLMEngine

    store = BlockStore.build(tiny, TEXTS[0] + " " + TEXTS[1], tmp_path / "s", BlockStoreConfig(block_tokens=16),
                             progress=False)
    assert len(store) >= 3
    cfg = ReasonerConfig(generation=GenerationSettings(memory_tokens=8, answer_tokens=8, temperature=0, top_p=1.0))
    ref = LycheeReasoner(tiny, HFEngine(tiny), config=cfg).answer(QUESTIONS, [store] * 3)
    with VLLMEngine(tiny, max_model_len=512, kv_cache_memory_bytes=32 << 20, enforce_eager=True) as engine:
        ours = LycheeReasoner(tiny, engine, config=cfg).answer(QUESTIONS, [store] * 3)
    assert sum(r.cost.tokens_generated for r in ref) > 0
    for q, o, r in zip(QUESTIONS, ours, ref):
        assert [s.memory for s in o.steps] == [s.memory for s in r.steps], q
        assert [s.block for s in o.steps] == [s.block for s in r.steps] == list(range(len(store)))
        assert (o.response, o.answer) == (r.response, r.answer), q
        assert (o.cost.tokens_generated, o.cost.positions_prefilled, o.cost.engine_requests) == (
            r.cost.tokens_generated, r.cost.positions_prefilled, r.cost.engine_requests)


def _answer_line(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("answer: ")]
    return line


@needs_vllm
def test_ask_engine_vllm_answers_as_engine_hf(tiny, tmp_path, capsys):
    tiny.save_pretrained(tmp_path / "comp")
    text = tmp_path / "big.txt"
    text.write_text("\n\n".join(TEXTS[:3]))
    args = ["ask", "--input", str(text), "--question", QUESTIONS[1], "--compressor", str(tmp_path / "comp"), *FAST]
    assert main(args + ["--engine", "hf"]) == 0
    hf = capsys.readouterr().out
    assert main(args + ["--engine", "vllm"]) == 0
    vllm_out = capsys.readouterr().out
    assert "reused (nothing encoded)" in vllm_out  # the same store: only the engine differs
    assert _answer_line(vllm_out) == _answer_line(hf)
    blocks = [ln for ln in hf.splitlines() if ln.startswith("blocks read: ")]
    assert blocks and blocks == [ln for ln in vllm_out.splitlines() if ln.startswith("blocks read: ")]


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_engine_vllm_without_vllm_is_a_clear_error(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXTS[0])
    assert main(["ask", "--input", str(text), "--question", "Q?", "--engine", "vllm", *FAST]) == 2
    err = capsys.readouterr().err
    assert "memcomp ask: --engine vllm: vLLM is not installed" in err and "scripts/setup_serving.sh" in err
    assert main(["eval", "--task", "synthetic", "--lengths", "64", "--engine", "vllm", "--out", str(tmp_path / "o"),
                 *FAST]) == 2
    assert "memcomp eval: --engine vllm: vLLM is not installed" in capsys.readouterr().err
