"""python -m memcomp.trainers.gate: trains on the synthetic task or a JSONL of labelled blocks for a saved compressor,
saves a gate that loads for that compressor only, writes and prints the thresholds and the validation / held-out
recall, precision and skipped fraction; bad input exits 2 with the reason before any training."""

import json
import math
import os

import pytest
from lychee_testutil import DISTRACTORS, fresh_compressor
from memcomp.trainers.gate import main

from memcomp.lychee.gate import Gate
from memcomp.memory import MemoryMismatchError


@pytest.fixture
def saved(base_tokenizer, tmp_path):
    comp = fresh_compressor(base_tokenizer)
    comp.save_pretrained(tmp_path / "comp")
    dis = tmp_path / "distractors.txt"
    dis.write_text("\n\n".join(DISTRACTORS))
    return comp, str(tmp_path / "comp"), str(dis)


def test_synthetic_run_saves_a_gate_and_its_numbers(saved, base_tokenizer, tmp_path, capsys):
    comp, comp_dir, dis = saved
    out = tmp_path / "gate"
    argv = [f"init_from={comp_dir}", f"out_dir={out}", f"distractors_file={dis}", "num_examples=8",
            "heldout_examples=4", "target_tokens=96", "block_tokens=32", "num_confusers=0", "epochs=2",
            "batch_size=8", "progress=false", "device=cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.load(open(out / "summary.json"))
    gate = Gate.load(out, comp)
    assert gate.thresholds == summary["thresholds"] and set(summary["thresholds"]) == {"prefilter", "sequential"}
    assert (summary["num_train_examples"], summary["num_val_examples"], summary["num_heldout_examples"]) == (6, 2, 4)
    for split in ("validation", "heldout"):
        for mode in ("prefilter", "sequential"):
            m = summary[split][mode]
            assert m["threshold"] == summary["thresholds"][mode] and 0 <= m["skipped"] <= 1
            assert f"{split:<10} {mode:<11} {m['threshold']:>9.4f}  {m['recall']:>6.3f}" in printed
    assert all(summary["validation"][m]["recall"] >= 0.95 for m in ("prefilter", "sequential"))  # by construction
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
    # Training rows: every block in the pre-filter view and, with ideal memories, in the sequential view.
    assert len(losses) == summary["steps"] > 0 and all(math.isfinite(x) for x in losses)
    with pytest.raises(MemoryMismatchError):
        Gate.load(out, fresh_compressor(base_tokenizer, seed=5))


def test_jsonl_examples_and_bad_input(saved, tmp_path, capsys):
    comp, comp_dir, _ = saved
    text = DISTRACTORS
    rows = [{"question": f"Which one talks about item {i}?", "blocks": [text[i], text[i + 6], text[i + 12]],
             "related": [True, False, False]} for i in range(6)]
    good = tmp_path / "labelled.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "gate"
    assert main([f"init_from={comp_dir}", f"out_dir={out}", f"data.source={good}", f"heldout_file={good}",
                 "epochs=1", "val_fraction=0.34", "progress=false", "device=cpu"]) == 0
    summary = json.load(open(out / "summary.json"))
    assert (summary["num_train_examples"], summary["num_val_examples"], summary["num_heldout_examples"]) == (4, 2, 6)
    assert summary["heldout"]["prefilter"]["num_blocks"] == 18 and summary["heldout"]["prefilter"]["num_related"] == 6
    capsys.readouterr()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "Q?", "blocks": ["a", "b"],
                                                            "related": [True]}) + "\n")
    cases = [
        ([], "run.init_from is required"),
        ([f"init_from={comp_dir}", f"data.source={tmp_path / 'none.jsonl'}"], "no such file"),
        ([f"init_from={comp_dir}", f"data.source={bad}"], "bad.jsonl:2: blocks, related and working_memories"),
        ([f"init_from={comp_dir}", "epochs=0"], "GateTrainConfig.epochs must be an int >= 1"),
        ([f"init_from={comp_dir}", "seed=3"], "ambiguous"),
        ([f"init_from={comp_dir}", "nonsense=1"], "unknown option"),
    ]
    for argv, message in cases:
        target = tmp_path / "never"
        assert main(argv + [f"out_dir={target}", "progress=false", "device=cpu"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("memcomp gate: ") and message in err, err
        assert not os.path.exists(target)
