"""The LycheeMemory block store (memcomp.lychee.store): streaming tokenization equal to one-shot tokenization,
blocks and their memories, spans and texts, resume after an interruption, lazy shard reads, and bad input."""

import copy
import io
import json
import math
import os
import random
import shutil

import pytest
import torch
from testutil import TEXTS

from memcomp.lychee import store as store_mod
from memcomp.lychee.store import BlockStore, BlockStoreConfig, token_windows
from memcomp.memory import Memory, MemoryFileError, MemoryMismatchError

QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Boundaries where tokenizer families disagree about what a safe split is: punctuation + newlines (one Qwen2
# pre-token), spaces before words (GPT-2 attaches them to the word), text after a newline (Metaspace would prefix a
# space on a fresh start), digits, multi-byte characters, special-token text, runs of whitespace.
PARTS = TEXTS + ["foo.\n\nbar", "x  \n\n  y", "1234567 89", "naïve café 中文字符 🙂🙂", "<|endoftext|>", "a,b;c!!\n",
                 "\t\t", "   ", "it's we've they'll"]
SEPARATORS = [" ", "\n", "", "  ", ".\n\n", "\r\n"]


def tricky_text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(PARTS) + rng.choice(SEPARATORS) for _ in range(n))


def _train(kind: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "qwen2":  # Qwen2's pre-tokenizer: its split regex, then byte-level without GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    else:  # SentencePiece-style: spaces become "▁", a prefix space before the first word
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(TEXTS * 4 + PARTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizers_by_kind(base_tokenizer):
    return {"gpt2": base_tokenizer, "qwen2": _train("qwen2"), "metaspace": _train("metaspace")}


def one_shot(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [s for s, _ in enc["offset_mapping"]]


def streamed(windows):
    windows = list(windows)
    return windows, [i for w in windows for i in w.ids], [s for w in windows for s in w.starts]


def random_pieces(text, seed=0, max_len=300):
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 7, rng.randint(1, max_len)])
        out.append(text[i:i + n])
        i += n
    return out


# ----------------------------------------------------------------------------------------------------------
# Streaming tokenization
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "metaspace"])
@pytest.mark.parametrize("window_chars", [64, 257])
def test_streamed_ids_equal_one_shot(tokenizers_by_kind, kind, window_chars, tmp_path):
    """The windows' ids and start offsets, concatenated, are exactly those of tokenizing the whole text at once,
    for three pre-tokenizer families, from a str, from pieces of any size, from a file and from a file object."""
    tok = tokenizers_by_kind[kind]
    text = tricky_text(300)
    ids, starts = one_shot(tok, text)
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    with open(path, encoding="utf-8", newline="") as f:
        for source in (text, random_pieces(text), path, f):
            windows, s_ids, s_starts = streamed(token_windows(tok, source, window_chars=window_chars))
            assert len(windows) > 10  # the text was cut many times
            assert all(w.exact for w in windows)
            assert s_ids == ids and s_starts == starts
            assert "".join(w.text for w in windows) == text
            ends = [w.char_start + len(w.text) for w in windows]
            assert [w.char_start for w in windows] == [0] + ends[:-1]


def test_streamed_ids_equal_one_shot_real_tokenizer(smollm2_loaded):
    """The same with a real model's tokenizer (SmolLM2's byte-level BPE, 49K merges) on Python source and the
    hand-made boundaries: ids and offsets equal one-shot tokenization."""
    import inspect
    import json.decoder
    import string
    import textwrap

    _, tok = smollm2_loaded
    text = "".join(inspect.getsource(m) for m in (textwrap, json.decoder, string)) + tricky_text(200)
    ids, starts = one_shot(tok, text)
    for window_chars in (256, 4096):
        windows, s_ids, s_starts = streamed(token_windows(tok, text, window_chars=window_chars))
        assert len(windows) > 10 and all(w.exact for w in windows)
        assert s_ids == ids and s_starts == starts


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "metaspace"])
def test_split_test_is_what_makes_the_stream_exact(tokenizers_by_kind, kind, monkeypatch):
    """With the split test switched off (every change of character class accepted as a cut), streaming differs
    from one-shot tokenization on the same text for every family: the test text does exercise unsafe cuts, and the
    split test is what rejects them."""
    tok = tokenizers_by_kind[kind]
    text = tricky_text(300)
    ids, _ = one_shot(tok, text)
    monkeypatch.setattr(store_mod, "_is_safe_cut", lambda *a: True)
    _, s_ids, _ = streamed(token_windows(tok, text, window_chars=64))
    assert s_ids != ids


def test_split_test_cases(tokenizers_by_kind):
    """Hand cases of each family's unsafe cut: GPT-2 after a space (the space belongs to the next word), Qwen2
    between punctuation and the newlines it takes, Metaspace before a word after a newline (a fresh start would
    prefix a space)."""
    safe = store_mod._is_safe_cut
    gpt2, qwen2, meta = (tokenizers_by_kind[k] for k in ("gpt2", "qwen2", "metaspace"))
    assert safe(gpt2, "sort order here", 4, 16) and not safe(gpt2, "sort order here", 5, 16)
    assert not safe(qwen2, "the order.\n\nnext", 10, 16) and safe(qwen2, "the order. next", 10, 16)
    assert not safe(meta, "the order\nnext", 10, 16) and safe(meta, "the order next", 9, 16)


def test_forced_cut_warns_and_is_recorded(make_compressor, tmp_path):
    """Text with no accepted cut for 8 windows (one long run of letters) is cut anyway: a UserWarning, an inexact
    window, the cut listed in the index; the blocks still cover the text."""
    comp = make_compressor()
    text = "ab" * 700
    with pytest.warns(UserWarning, match="no safe tokenization cut"):
        windows = list(token_windows(comp.tokenizer, text, window_chars=64))
    assert [w.exact for w in windows].count(False) >= 1 and "".join(w.text for w in windows) == text
    with pytest.warns(UserWarning, match="no safe tokenization cut"):
        store = BlockStore.build(comp, text, tmp_path / "s", BlockStoreConfig(block_tokens=64, window_chars=64),
                                 progress=False)
    assert store.index["inexact_cuts"] == [w.char_start + len(w.text) for w in windows if not w.exact]
    assert "".join(store.text(i) for i in range(len(store))) == text


def test_token_windows_rejects_bad_input(base_tokenizer, tmp_path):
    with pytest.raises(TypeError, match="fast"):
        list(token_windows(object(), "text"))
    with pytest.raises(ValueError, match="window_chars"):
        token_windows(base_tokenizer, "text", window_chars=16)
    with pytest.raises(TypeError, match="bytes"):
        token_windows(base_tokenizer, b"text")
    with pytest.raises(TypeError, match="piece 1"):
        list(token_windows(base_tokenizer, ["ok", 3]))
    with pytest.raises(TypeError, match="binary"):
        token_windows(base_tokenizer, io.BytesIO(b"text"))
    with pytest.raises(FileNotFoundError):
        token_windows(base_tokenizer, tmp_path / "missing.txt")
    existing = tmp_path / "notes.txt"
    existing.write_text("hello")
    with pytest.raises(ValueError, match="pathlib.Path"):  # a str is text; one naming a file is refused
        token_windows(base_tokenizer, str(existing))
    assert [w.text for w in token_windows(base_tokenizer, [str(existing)])] == [str(existing)]


# ----------------------------------------------------------------------------------------------------------
# Building and reading
# ----------------------------------------------------------------------------------------------------------


def test_build_and_read_back(make_compressor, tmp_path, close_to_oracle):
    """Blocks of B tokens with their memories ([ceil(n / C), d], the right fingerprint), token ids, texts and spans;
    the memories agree with encoding the whole text at once under the tolerance policy (fp64 oracle)."""
    comp = make_compressor()
    text = tricky_text(60, seed=1)
    ids = comp.tokenize(text)
    B = 16
    store = BlockStore.build(comp, text, tmp_path / "s", BlockStoreConfig(block_tokens=B, shard_blocks=3,
                                                                          window_chars=64), progress=False)
    n = math.ceil(ids.numel() / B)
    assert len(store) == n and store.num_tokens == ids.numel() and ids.numel() % B  # a partial last block
    assert len(store.index["shards"]) == math.ceil(n / 3)
    mems = list(store)
    for i, (mem, block) in enumerate(zip(mems, store.blocks)):
        assert isinstance(mem, Memory) and mem.num_tokens == block.num_tokens == min(B, ids.numel() - i * B)
        assert mem.embeddings.shape == (math.ceil(mem.num_tokens / 4), comp.hidden_size)
        assert mem.chunk_size == 4 and mem.fingerprint == comp.fingerprint()
        assert torch.equal(store[i].embeddings, mem.embeddings)
        assert torch.equal(store.token_ids(i), ids[block.token_start:block.token_end])
        assert store.text(i) == text[block.char_start:block.char_end]
        assert block.byte_start == len(text[:block.char_start].encode())
        assert block.byte_end == len(text[:block.char_end].encode())
    assert "".join(store.text(i) for i in range(n)) == text
    assert store[-1].num_tokens == ids.numel() % B
    comp.check_memory(mems[0])
    assert len(comp.generate(mems[0], "Q:", max_new_tokens=2)) == 1  # a block's memory feeds the decoder

    ours = torch.cat([m.embeddings for m in mems])
    eager = comp.encode(text).embeddings
    close_to_oracle(ours, eager, fp64_memory(comp, ids), "block store vs whole-text encode")


def fp64_memory(comp, ids):
    """The encoder's math in fp64, chunk by chunk: final-layer hidden states (after the final norm) of each
    C-token chunk run alone, averaged over the chunk, projected."""
    comp64 = copy.deepcopy(comp).to(torch.float64)
    with torch.no_grad():
        rows = [comp64.base(input_ids=ids[s:s + 4][None]).last_hidden_state[0].mean(0)
                for s in range(0, ids.numel(), 4)]
        return comp64.projection(torch.stack(rows))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_blocks(make_compressor, tmp_path, dtype):
    """Blocks keep the compressor's dtype, bit for bit: the store writes the encoder's output as it is (one encoder
    call here, so the same micro-batches as encoding the blocks' ids in one call)."""
    comp = make_compressor().to(dtype)
    store = BlockStore.build(comp, " ".join(TEXTS), tmp_path / "s", BlockStoreConfig(block_tokens=8),
                             progress=False)
    assert store.index["dtype"] == str(dtype).removeprefix("torch.")
    direct = comp.encode([store.token_ids(i) for i in range(len(store))])
    for i, mem in enumerate(store):
        assert mem.embeddings.dtype == dtype and torch.equal(mem.embeddings, direct[i].embeddings)


def test_shards_are_standard_safetensors(make_compressor, tmp_path):
    """A shard, written incrementally by the store, loads with safetensors' own reader, with the metadata and the
    rows the index names."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    comp = make_compressor()
    store = BlockStore.build(comp, TEXTS[0], tmp_path / "s", BlockStoreConfig(block_tokens=8, shard_blocks=2),
                             progress=False)
    shard = store.index["shards"][0]
    path = tmp_path / "s" / shard["file"]
    tensors = load_file(path)
    assert set(tensors) == {"embeddings", "token_ids", "text"}
    assert tensors["embeddings"].shape == (shard["rows"], comp.hidden_size)
    assert tensors["token_ids"].dtype == torch.int32 and tensors["text"].dtype == torch.uint8
    b = store.blocks[1]
    assert torch.equal(tensors["embeddings"][b.row_start:b.row_end], store[1].embeddings)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["fingerprint"] == comp.fingerprint() and f.metadata()["shard"] == "0"


def test_sources_give_the_same_store(make_compressor, tmp_path):
    """A str, a Path, an open text file and an iterator of pieces give byte-identical stores."""
    comp = make_compressor()
    text = tricky_text(40, seed=2)
    path = tmp_path / "in.txt"
    path.write_text(text, encoding="utf-8", newline="")
    cfg = BlockStoreConfig(block_tokens=8, shard_blocks=4, window_chars=64)
    with open(path, encoding="utf-8", newline="") as f:
        sources = {"str": text, "path": path, "file": f, "pieces": iter(random_pieces(text, seed=3))}
        for name, source in sources.items():
            BlockStore.build(comp, source, tmp_path / name, cfg, progress=False)
    ref = tmp_path / "str"
    for name in ("path", "file", "pieces"):
        assert sorted(os.listdir(tmp_path / name)) == sorted(os.listdir(ref))
        for fname in os.listdir(ref):
            assert (tmp_path / name / fname).read_bytes() == (ref / fname).read_bytes(), (name, fname)


def test_short_input_is_one_partial_block(make_compressor, tmp_path):
    comp = make_compressor()
    text = "Open file"
    T = comp.tokenize(text).numel()
    assert T < 4096 and T % 4
    store = BlockStore.build(comp, text, tmp_path / "s", progress=False)  # the default 4,096-token blocks
    assert len(store) == 1 and store[0].num_tokens == T and store[0].embeddings.shape[0] == math.ceil(T / 4)
    assert store.text(0) == text
    torch.testing.assert_close(store[0].embeddings, comp.encode(text).embeddings, rtol=0, atol=0)


def test_empty_input_is_an_error_and_writes_nothing(make_compressor, tmp_path):
    comp = make_compressor()
    for source in ("", ["", ""], iter([])):
        with pytest.raises(ValueError, match="empty"):
            BlockStore.build(comp, source, tmp_path / "s", progress=False)
        assert not (tmp_path / "s").exists()
    # Nothing already written is lost: overwrite=True with empty input leaves the old store whole.
    BlockStore.build(comp, TEXTS[0], tmp_path / "old", progress=False)
    with pytest.raises(ValueError, match="empty"):
        BlockStore.build(comp, "", tmp_path / "old", progress=False, overwrite=True)
    assert BlockStore.open(tmp_path / "old", comp).text(0) == TEXTS[0]


def test_bad_configuration(make_compressor, tmp_path):
    comp = make_compressor()
    for kwargs in ({"block_tokens": 0}, {"shard_blocks": True}, {"window_chars": 63}, {"block_tokens": 2.0}):
        with pytest.raises(ValueError, match="BlockStoreConfig"):
            BlockStoreConfig(**kwargs)
    with pytest.raises(ValueError, match="multiple of the compressor's chunk_size"):
        BlockStore.build(comp, "text", tmp_path / "s", BlockStoreConfig(block_tokens=6))
    with pytest.raises(TypeError, match="BlockStoreConfig"):
        BlockStore.build(comp, "text", tmp_path / "s", {"block_tokens": 8})
    assert not (tmp_path / "s").exists()


def test_modes_restored(make_compressor, tmp_path):
    """Encoding runs in eval mode; each module's own mode is restored afterwards."""
    comp = make_compressor()
    comp.train()
    comp.projection.eval()
    seen = []
    encode = comp.encode
    comp.encode = lambda *a, **k: (seen.append(comp.training), encode(*a, **k))[1]
    before = {name: m.training for name, m in comp.named_modules()}
    BlockStore.build(comp, TEXTS[1], tmp_path / "s", BlockStoreConfig(block_tokens=8), progress=False)
    assert seen and not any(seen)
    assert {name: m.training for name, m in comp.named_modules()} == before


# ----------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def _counting(comp, fail_at=None):
    """Wrap comp.encode: record the number of blocks per call; raise _Interrupt on call number ``fail_at``."""
    calls = []
    encode = type(comp).encode.__get__(comp)  # the real method, not an earlier wrapper

    def wrapped(texts, **kwargs):
        if fail_at is not None and len(calls) + 1 == fail_at:
            raise _Interrupt
        calls.append(len(texts))
        return encode(texts, **kwargs)

    comp.encode = wrapped
    return calls


def _files(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_resume_after_interruption(make_compressor, tmp_path):
    """Killed during shard 3 of 4 (an exception from the encoder, mid-shard): the directory does not open, the
    rerun re-encodes only the blocks of shards 3 and 4, leaves shards 1 and 2 untouched, and the result is
    byte-identical to an uninterrupted build."""
    comp = make_compressor(chunks_per_batch=2)  # 8-token blocks are 2 chunks: one block per encoder call
    text = " ".join(TEXTS)
    cfg = BlockStoreConfig(block_tokens=8, shard_blocks=6, window_chars=64)
    n_blocks = math.ceil(comp.tokenize(text).numel() / 8)
    assert math.ceil(n_blocks / 6) == 4  # the test needs exactly four shards

    full_calls = _counting(comp)
    BlockStore.build(comp, text, tmp_path / "full", cfg, progress=False)
    assert full_calls == [1] * n_blocks

    d = tmp_path / "s"
    _counting(comp, fail_at=2 * 6 + 3)  # the third block of the third shard: its file is half written
    with pytest.raises(_Interrupt):
        BlockStore.build(comp, text, d, cfg, progress=False)
    assert sorted(os.listdir(d)) == ["progress.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(MemoryFileError, match="interrupted"):
        BlockStore.open(d)
    progress = json.loads((d / "progress.json").read_text())
    assert progress["state"]["token"] == 12 * 8 and progress["state"]["resume_char"] > 0  # resumes mid-text
    kept = {name: os.stat(d / name) for name in ("shard-00000.safetensors", "shard-00001.safetensors")}
    (d / "shard-00002.safetensors.tmp-999999").write_bytes(b"left by a killed build")

    resumed_calls = _counting(comp)
    store = BlockStore.build(comp, text, d, cfg, progress=False)
    assert sum(resumed_calls) == n_blocks - 12  # only the blocks of shards 3 and 4
    for name, st in kept.items():
        now = os.stat(d / name)
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size)
    assert _files(d) == _files(tmp_path / "full")
    assert "".join(store.text(i) for i in range(len(store))) == text


def test_resume_refuses_another_source_compressor_or_config(make_compressor, tmp_path):
    comp = make_compressor(chunks_per_batch=2)
    text = " ".join(TEXTS)
    cfg = BlockStoreConfig(block_tokens=8, shard_blocks=4, window_chars=64)
    d = tmp_path / "s"
    _counting(comp, fail_at=9)
    with pytest.raises(_Interrupt):
        BlockStore.build(comp, text, d, cfg, progress=False)
    _counting(comp)
    before = _files(d)
    with pytest.raises(ValueError, match="another source"):
        BlockStore.build(comp, text.replace("Return", "Yield"), d, cfg, progress=False)
    with pytest.raises(ValueError, match="another source"):  # a source shorter than what was encoded
        BlockStore.build(comp, text[:20], d, cfg, progress=False)
    with pytest.raises(MemoryMismatchError, match="another compressor"):
        BlockStore.build(make_compressor(seed=1), text, d, cfg, progress=False)
    with pytest.raises(ValueError, match="block_tokens"):
        BlockStore.build(comp, text, d, BlockStoreConfig(block_tokens=12, shard_blocks=4), progress=False)
    assert _files(d) == before  # nothing already written was lost
    damaged = tmp_path / "damaged"
    shutil.copytree(d, damaged)
    shard = damaged / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(MemoryFileError, match="shard-00000.safetensors is missing or damaged"):
        BlockStore.build(comp, text, damaged, cfg, progress=False)
    BlockStore.build(comp, text, d, cfg, progress=False)  # the right source still resumes


# ----------------------------------------------------------------------------------------------------------
# Opening: laziness, mismatch, damaged files, reuse
# ----------------------------------------------------------------------------------------------------------


def test_open_reads_only_the_requested_shard(make_compressor, tmp_path, monkeypatch):
    """A store of 1,000 blocks in 16 shards: opening it reads no shard; a block reads its own shard only."""
    comp = make_compressor()
    text = " ".join(str(i % 10) for i in range(2000))  # 3,999 tokens with this tokenizer: 1,000 blocks of 4
    BlockStore.build(comp, text, tmp_path / "s", BlockStoreConfig(block_tokens=4, shard_blocks=64), progress=False)
    opened = []
    real = store_mod.safe_open
    monkeypatch.setattr(store_mod, "safe_open", lambda path, *a, **k: (opened.append(os.path.basename(path)),
                                                                       real(path, *a, **k))[1])
    store = BlockStore.open(tmp_path / "s", comp)
    assert len(store) == 1000 and len(store.index["shards"]) == 16 and opened == []
    mem = store[700]
    assert opened == ["shard-00010.safetensors"] and mem.num_tokens == 4
    store.text(700)
    store.token_ids(700)
    assert set(opened) == {"shard-00010.safetensors"}


def test_other_compressor_raises_mismatch(make_compressor, tmp_path):
    comp = make_compressor()
    BlockStore.build(comp, TEXTS[0], tmp_path / "s", BlockStoreConfig(block_tokens=8), progress=False)
    with pytest.raises(MemoryMismatchError, match="fingerprint"):
        BlockStore.open(tmp_path / "s", make_compressor(seed=1))
    with pytest.raises(MemoryMismatchError, match="chunk_size"):
        BlockStore.open(tmp_path / "s", make_compressor(chunk_size=8))
    store = BlockStore.open(tmp_path / "s")  # without a compressor: checked where the memory is used
    with pytest.raises(MemoryMismatchError):
        make_compressor(seed=1).generate(store[0], "Q:")
    with torch.no_grad():
        comp.model.get_input_embeddings().weight[5, 0] += 1.0  # weights changed after the build
    with pytest.raises(MemoryMismatchError, match="fingerprint"):
        BlockStore.open(tmp_path / "s", comp)


def test_damaged_store_raises_file_error_naming_the_file(make_compressor, tmp_path):
    comp = make_compressor()
    d = tmp_path / "s"
    store = BlockStore.build(comp, " ".join(TEXTS), d, BlockStoreConfig(block_tokens=8, shard_blocks=4),
                             progress=False)
    store.verify()
    shard = d / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])  # truncated after opening
    with pytest.raises(MemoryFileError, match="shard-00001.safetensors is truncated"):
        store[5]
    with pytest.raises(MemoryFileError, match="shard-00001.safetensors is truncated"):
        BlockStore.open(d)
    store[0]  # other shards still read
    flipped = bytearray(data)
    flipped[5000] ^= 0xFF  # same size, corrupt data: the size check passes, verify() does not
    shard.write_bytes(bytes(flipped))
    BlockStore.open(d)
    with pytest.raises(MemoryFileError, match="shard-00001.safetensors is corrupt"):
        BlockStore.open(d).verify()
    shard.unlink()
    with pytest.raises(MemoryFileError, match="shard-00001.safetensors is missing"):
        BlockStore.open(d)
    (d / "index.json").write_text('{"format": "memcomp-block-st')
    with pytest.raises(MemoryFileError, match="index.json"):
        BlockStore.open(d)
    with pytest.raises(MemoryFileError, match="no block store"):
        BlockStore.open(tmp_path / "nowhere")


def test_indexing(make_compressor, tmp_path):
    store = BlockStore.build(make_compressor(), TEXTS[0], tmp_path / "s", BlockStoreConfig(block_tokens=8),
                             progress=False)
    with pytest.raises(IndexError):
        store[len(store)]
    with pytest.raises(TypeError):
        store[0.0]
    assert store.text(-1) == store.text(len(store) - 1)


def test_existing_store_is_reused_or_refused(make_compressor, tmp_path):
    """Building into a complete store of the same source, compressor and config opens it without encoding;
    anything else raises unless overwrite=True."""
    comp = make_compressor()
    d = tmp_path / "s"
    cfg = BlockStoreConfig(block_tokens=8)
    BlockStore.build(comp, TEXTS[0], d, cfg, progress=False)
    before = _files(d)
    calls = _counting(comp)
    reused = BlockStore.build(comp, [TEXTS[0]], d, cfg, progress=False)
    assert "".join(reused.text(i) for i in range(len(reused))) == TEXTS[0] and calls == []
    with pytest.raises(FileExistsError, match="source text differs"):
        BlockStore.build(comp, TEXTS[1], d, cfg, progress=False)
    with pytest.raises(FileExistsError, match="block_tokens"):
        BlockStore.build(comp, TEXTS[0], d, BlockStoreConfig(block_tokens=12), progress=False)
    assert _files(d) == before
    store = BlockStore.build(comp, TEXTS[1], d, cfg, progress=False, overwrite=True)
    assert "".join(store.text(i) for i in range(len(store))) == TEXTS[1] and calls


def test_progress_bar(make_compressor, tmp_path, capsys):
    """progress=True shows a bar in source bytes that reaches the total; progress=False shows none."""
    comp = make_compressor()
    text = " ".join(TEXTS)
    BlockStore.build(comp, text, tmp_path / "a", BlockStoreConfig(block_tokens=8), progress=True)
    err = capsys.readouterr().err
    assert "memcomp block store" in err and f"{len(text.encode())}/{len(text.encode())}" in err
    BlockStore.build(comp, text, tmp_path / "b", BlockStoreConfig(block_tokens=8), progress=False)
    assert "memcomp block store" not in capsys.readouterr().err


def test_rss_corpus_is_deterministic(tmp_path):
    """The streaming-memory benchmark's corpus (memcomp.lychee.store_rss): the same text for a seed, of the
    length asked for, written without holding it."""
    from memcomp.lychee.store_rss import write_corpus

    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    assert write_corpus(str(a), 5000) == 5000 and write_corpus(str(b), 5000) == 5000
    write_corpus(str(c), 5000, seed=1)
    assert a.read_text() == b.read_text() != c.read_text() and len(a.read_text()) == 5000
