"""The main job's pieces and a smoke run of it (the full ~10-minute run is the README's command)."""

import json

import pytest

from memcomp.cli import main
from memcomp.demo.corpus import stdlib_passages
from memcomp.demo.run import make_config, mean_interval, position_accuracy, rouge_l_f1, wilson_interval


def test_corpus_is_real_text_with_a_heldout_split():
    splits = stdlib_passages()
    assert len(splits["train"]) > 500 and len(splits["heldout"]) > 50
    assert not set(splits["train"]) & set(splits["heldout"])


def test_metrics():
    assert rouge_l_f1([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l_f1([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert rouge_l_f1([], [1]) == 0.0
    assert position_accuracy([1, 2], [1, 3, 4]) == pytest.approx(1 / 3)
    # Wilson score interval, 95 % (worked by hand): 8 of 64 -> (0.06472, 0.22775); 0 of 10 -> (0, 0.27754)
    assert wilson_interval(8, 64) == pytest.approx((0.06472, 0.22775), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-4)
    assert mean_interval([1, 0, 1, 0]) == pytest.approx((0.5 - 1.96 * 0.57735 / 2, 0.5 + 1.96 * 0.57735 / 2), abs=1e-4)


def test_config_rejects_unknown_keys_and_presets():
    with pytest.raises(ValueError, match="unknown option 'stepz'"):
        make_config("tiny", "cpt", ["stepz=3"])
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("huge")
    cfg, options = make_config("tiny", "cpt", ["steps=5", "eval_passages=7"])
    assert cfg.optim.steps == 5 and options["eval_passages"] == 7 and cfg.stage == "cpt1"
    sft, _ = make_config("tiny", "sft", ["out_dir=runs/x/sft"])
    assert sft.stage == "sft" and sft.compressor.freeze_projection
    assert sft.compressor.init_from == "runs/x/cpt/compressor"


def test_cli_rejects_bad_overrides(capsys):
    assert main(["demo", "stepz=3"]) == 2
    assert "unknown option" in capsys.readouterr().err


def test_demo_smoke_end_to_end_cpt_then_sft(tmp_path, capsys):
    from memcomp import MemoryCompressor

    out = tmp_path / "demo"
    assert main(["demo", "--preset", "smoke", f"out_dir={json.dumps(str(out / 'cpt'))}"]) == 0
    summary = json.loads((out / "cpt" / "summary.json").read_text())
    assert len(summary["losses"]) == 6 and {"reconstruction", "lm"} <= set(summary["final_task_loss"])
    for key in ("memory_token_accuracy", "control_token_accuracy", "memory_rouge_l", "control_rouge_l"):
        assert 0.0 <= summary["eval"][key] <= 1.0
    assert isinstance(summary["memory_carries_information"], bool)
    assert (out / "cpt" / "loss.png").stat().st_size > 1000
    comp = MemoryCompressor.from_pretrained(out / "cpt" / "compressor")
    assert comp.config.chunk_size == 4
    assert "memory carries information" in capsys.readouterr().out

    assert main(["demo", "--preset", "smoke", "--stage", "sft", f"out_dir={json.dumps(str(out / 'sft'))}"]) == 0
    sft = json.loads((out / "sft" / "summary.json").read_text())
    ev = sft["eval"]
    assert ev["questions"] == 6 and ev["passages"] == 2  # every question of a passage, three per passage
    for name in ("memory_answer_accuracy", "control_answer_accuracy"):
        lo, hi = ev[name + "_ci95"]
        assert 0.0 <= lo <= ev[name] <= hi <= 1.0
    assert sft["train_seconds"] > 0 and sft["steps_trained_now"] == 6
    # Run again: nothing left to train; the summary keeps the training time and says this run only evaluated.
    assert main(["demo", "--preset", "smoke", "--stage", "sft", f"out_dir={json.dumps(str(out / 'sft'))}"]) == 0
    again = json.loads((out / "sft" / "summary.json").read_text())
    assert again["steps_trained_now"] == 0 and again["train_seconds"] == pytest.approx(sft["train_seconds"])
    assert "already trained: evaluation only" in capsys.readouterr().out
    assert main(["demo", "--preset", "smoke", "--stage", "sft",
                 f"out_dir={json.dumps(str(tmp_path / 'nowhere' / 'sft'))}"]) == 2
