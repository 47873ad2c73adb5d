"""``memcomp ask`` and ``memcomp eval``: a saved tiny compressor end to end on the HF engine; the input's block store
built on the first question and reused (nothing encoded, nothing rewritten) on the next; clear errors (exit 2)
for a missing input, an empty one, a question over its budget, a gate of another compressor, a missing data file."""

import json
import os
import re

import pytest
from testutil import TEXTS

from memcomp.cli import main
from memcomp.lychee.gate import Gate
from memcomp.lychee.harness import store_directory

FAST = ["--block-tokens", "16", "--memory-tokens", "4", "--answer-tokens", "4", "--temperature", "0",
        "--device", "cpu", "--no-progress"]


@pytest.fixture
def saved(make_compressor, tmp_path):
    comp = make_compressor()
    comp.save_pretrained(tmp_path / "comp")
    text = tmp_path / "big.txt"
    text.write_text("\n\n".join(TEXTS[:3]))
    return comp, str(tmp_path / "comp"), str(text)


def test_ask_builds_the_store_once_and_reuses_it(saved, capsys, monkeypatch, tmp_path):
    from memcomp import MemoryCompressor

    comp, comp_dir, text = saved
    encodes = []
    real = MemoryCompressor.encode_chunks
    monkeypatch.setattr(MemoryCompressor, "encode_chunks",
                        lambda self, *a, **k: encodes.append(len(a[0])) or real(self, *a, **k))
    assert main(["ask", "--input", text, "--question", "Which file opens the stream?", "--compressor", comp_dir]
                + FAST) == 0
    out = capsys.readouterr().out
    store = store_directory(text, comp, 16)
    assert store.startswith(text + ".memcomp") and os.path.isfile(os.path.join(store, "index.json"))
    n_blocks = len(json.load(open(os.path.join(store, "index.json")))["blocks"])
    assert f"({n_blocks} blocks of up to 16 tokens, built" in out and "answer: " in out
    assert f"blocks read: {n_blocks} of {n_blocks} (no gate: every block)" in out
    assert out.count("no score") == n_blocks and sum(encodes) == n_blocks
    mtimes = {f: os.stat(os.path.join(store, f)).st_mtime_ns for f in os.listdir(store)}

    encodes.clear()
    assert main(["ask", "--input", text, "--question", "What can be supplied?", "--compressor", comp_dir]
                + FAST) == 0
    out = capsys.readouterr().out
    assert "reused (nothing encoded)" in out and encodes == []
    assert {f: os.stat(os.path.join(store, f)).st_mtime_ns for f in os.listdir(store)} == mtimes

    # An edited input is re-encoded into its keyed store; a store folder the user names is never replaced.
    with open(text, "a") as f:
        f.write("\n\nA new paragraph at the end.")
    assert main(["ask", "--input", text, "--question", "What can be supplied?", "--compressor", comp_dir]
                + FAST) == 0
    assert ", built in" in capsys.readouterr().out and sum(encodes) > n_blocks
    other_input = tmp_path / "other.txt"
    other_input.write_text(TEXTS[-1] + " Another input.")
    assert main(["ask", "--input", str(other_input), "--question", "Q?", "--compressor", comp_dir, "--store", store]
                + FAST) == 2
    assert "differs" in capsys.readouterr().err and os.path.isfile(os.path.join(store, "index.json"))

    # With a gate: its score of every block read is printed; a cache folder keeps the store away from the input.
    gate = Gate(comp)
    gate.thresholds = {"prefilter": 0.5, "sequential": 0.5}  # untrained: every score is 0.5, every block read
    gate.save(tmp_path / "gate")
    assert main(["ask", "--input", text, "--question", "What can be supplied?", "--compressor", comp_dir,
                 "--gate", str(tmp_path / "gate"), "--cache-dir", str(tmp_path / "cache")] + FAST) == 0
    out = capsys.readouterr().out
    total = int(re.search(r"\((\d+) blocks of up to 16 tokens", out).group(1))  # the edited input's blocks
    assert total > n_blocks and f"blocks read: {total} of {total} (gate sequential)" in out
    assert out.count("score 0.500") == total and str(tmp_path / "cache") in out


def test_ask_and_eval_errors(saved, make_compressor, capsys, tmp_path):
    _, comp_dir, text = saved
    cases = [
        (["--input", str(tmp_path / "missing.txt"), "--question", "Q?"], "not found"),
        (["--input", text, "--question", "why " * 40, "--question-tokens", "8"], "longer than its budget of 8"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases.append((["--input", str(empty), "--question", "Q?"], "is empty"))
    other = Gate(make_compressor(seed=3))
    other.thresholds = {"prefilter": 0.5, "sequential": 0.5}
    other.save(tmp_path / "other_gate")
    cases.append((["--input", text, "--question", "Q?", "--gate", str(tmp_path / "other_gate")], "trained for"))
    from memcomp.lychee.store import BlockStore, BlockStoreConfig

    foreign = tmp_path / "foreign_store"
    BlockStore.build(make_compressor(seed=4), "Some other text. " * 8, foreign, BlockStoreConfig(block_tokens=16),
                     progress=False)
    cases.append((["--input", text, "--question", "Q?", "--store", str(foreign)], "fingerprint"))
    for argv, message in cases:
        assert main(["ask", "--compressor", comp_dir] + argv + FAST) == 2, argv
        err = capsys.readouterr().err
        assert "memcomp ask: " in err and message in err, err
    assert not os.path.exists(text + ".memcomp")  # nothing was encoded by any of them
    assert main(["eval", "--task", "ruler-hqa", "--lengths", "50", "--compressor", comp_dir] + FAST) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["eval", "--task", "synthetic", "--systems", "lychee", "--lengths", "64", "--compressor", comp_dir]
                + FAST) == 2
    assert "needs a trained gate" in capsys.readouterr().err


def test_eval_cli_end_to_end(saved, capsys, tmp_path):
    _, comp_dir, _ = saved
    data = tmp_path / "distractors.txt"
    data.write_text("\n\n".join(TEXTS))
    out = tmp_path / "eval"
    assert main(["eval", "--task", "synthetic", "--systems", "lychee-nogate,memagent", "--lengths", "64",
                 "--num-questions", "2", "--hops", "1", "--chunk-tokens", "48", "--data", str(data), "--out", str(out),
                 "--compressor", comp_dir] + FAST) == 0
    printed = capsys.readouterr().out
    report = json.load(open(out / "eval.json"))
    assert [(r["system"], r["length"], r["num_questions"]) for r in report["rows"]] == [
        ("lychee-nogate", 64, 2), ("memagent", 64, 2)]
    assert all(isinstance(q["prediction"], str) for q in report["questions"])
    assert "| lychee-nogate | 64 | 2 |" in printed and (out / "eval.md").exists()
    assert "length 64, MemAgent / lychee-nogate: time per question" in printed
