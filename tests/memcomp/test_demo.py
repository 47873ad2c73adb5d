"""The main job's pieces and a smoke run of it (the full ~10-minute run is the README's command)."""

import dataclasses
import json

import pytest
import torch

from memcomp.cli import main
from memcomp.demo.corpus import stdlib_passages
from memcomp.demo.run import answer_word, make_config, mean_interval, position_accuracy, rouge_l_f1, wilson_interval


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


def test_answer_word_cuts_the_end_marker_even_when_truncated():
    """The held-out QA criterion: the answer's first word, cut where ChatML's end marker (7 text tokens for the tiny
    tokenizer) begins -- also when the 6-token answer budget ended inside it, which used to score "Decode<|im"
    against the gold "Decode" as wrong."""
    assert answer_word("Decode<|im") == "Decode"
    assert answer_word("Thread-local<") == "Thread-local"
    assert answer_word("the<|im_end|>\n<|im") == "the"
    assert answer_word(" Return values of") == "Return"
    assert answer_word("a <|i") == "a"
    assert answer_word("<https://json.org> is") == "<https://json.org>"   # a "<" that does not start the marker
    assert answer_word("x<y") == "x<y"
    assert answer_word("Thread-loc") == "Thread-loc" and answer_word("") == "" and answer_word("<|im_end|>") == ""


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
    rl, options = make_config("tiny", "rl", ["out_dir=runs/x/rl", "eval_questions=200", "rl.group_size=4"])
    assert rl.stage == "dapo" and rl.compressor.init_from == "runs/x/sft/compressor"
    assert rl.rl.group_size == 4 and options["eval_questions"] == 200
    with pytest.raises(ValueError, match="unknown demo stage"):
        make_config("tiny", "gate")
    with pytest.raises(ValueError, match="recipe 'smollm2' has no stage 'dapo'"):
        make_config("smollm2", "rl")


def test_cli_rejects_bad_overrides(capsys):
    assert main(["demo", "stepz=3"]) == 2
    assert "unknown option" in capsys.readouterr().err


def test_demo_smoke_end_to_end_cpt_then_sft_then_rl(tmp_path, capsys):
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

    # RL: DAPO from the SFT compressor; the after-SFT side of the comparison is the SFT stage's own evaluation
    # (same questions, same memories, same greedy decoding).
    assert main(["demo", "--preset", "smoke", "--stage", "rl", f"out_dir={json.dumps(str(out / 'rl'))}"]) == 0
    rl = json.loads((out / "rl" / "summary.json").read_text())
    assert rl["eval"]["sft"] == json.loads(json.dumps(ev))
    assert rl["eval"]["rl"]["questions"] == 6 and len(rl["history"]) == 6 and rl["steps_trained_now"] == 6
    lo, hi = rl["eval"]["rl_minus_sft_ci95"]
    assert lo <= rl["eval"]["rl_minus_sft"] <= hi and isinstance(rl["rl_above_sft"], bool)
    changed = rl["eval"]["questions_changed"]
    assert rl["eval"]["rl_minus_sft"] == pytest.approx((changed["wrong_to_right"] - changed["right_to_wrong"]) / 6)
    assert rl["eval"]["rl"]["memory_answer_accuracy"] - ev["memory_answer_accuracy"] == pytest.approx(
        rl["eval"]["rl_minus_sft"])
    sft_comp = MemoryCompressor.from_pretrained(out / "sft" / "compressor")
    rl_comp = MemoryCompressor.from_pretrained(out / "rl" / "compressor")
    assert torch.equal(rl_comp.projection.weight, sft_comp.projection.weight)  # DAPO trains the decoder only
    decoder_moved = any(not torch.equal(a, b) for a, b in zip(rl_comp.model.parameters(), sft_comp.model.parameters()))
    assert decoder_moved
    assert "RL above SFT by more than two standard errors" in capsys.readouterr().out
    assert main(["demo", "--preset", "smoke", "--stage", "rl",
                 f"out_dir={json.dumps(str(tmp_path / 'nowhere' / 'rl'))}"]) == 2
    assert "continues from the SFT demo" in capsys.readouterr().err


def test_compare_qa_of_a_compressor_with_itself_is_a_zero_difference(tmp_path):
    """The RL comparison's plumbing: one compressor as both SFT and RL gives identical accuracies and a paired
    difference of exactly 0 (same questions, same memories, same decoding on both sides)."""
    from memcomp.trainers.build import build_compressor
    from memcomp.trainers.recipes import prepare

    from memcomp.demo.run import compare_qa

    cfg, _ = make_config("smoke", "sft", [f"out_dir={json.dumps(str(tmp_path / 'sft'))}"])
    cfg = prepare(cfg)
    comp = build_compressor(dataclasses.replace(cfg.compressor, init_from=""), cfg.fqlora, device="cpu",
                            dtype="float32", seed=0).eval()
    result = compare_qa(comp, comp, cfg, 6)
    assert result["sft"] == result["rl"] and result["rl_minus_sft"] == 0.0 and result["rl_minus_sft_z"] == 0.0
    assert result["questions_changed"] == {"wrong_to_right": 0, "right_to_wrong": 0}


def test_demo_smoke_lychee(tmp_path, capsys):
    """The lychee stage from the CPT demo's compressor: reasoner SFT on the trace records, a gate on its weights,
    then LycheeMemory, LycheeMemory without gate, MemAgent and full context on the same held-out questions."""
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "smoke", f"out_dir={json.dumps(str(out / 'cpt'))}"]) == 0
    capsys.readouterr()
    assert main(["demo", "--preset", "smoke", "--stage", "lychee", "lychee.eval_questions=4",
                 f"out_dir={json.dumps(str(out / 'lychee'))}"]) == 0
    printed = capsys.readouterr().out
    ly = json.loads((out / "lychee" / "summary.json").read_text())
    assert [r["system"] for r in ly["rows"]] == ["lychee", "lychee-nogate", "memagent", "full"]
    for r in ly["rows"]:
        assert r["num_questions"] == 4
        if not r.get("skipped"):
            lo, hi = r["ci95"]
            assert 0.0 <= lo <= r["accuracy"] <= hi <= 1.0 and r["seconds_per_question"] > 0
    calls = ly["calls"]  # each call alone on the validation records
    assert {"final_answer", "full_context", "lychee_update (evidence)", "memagent_update (evidence)"} <= set(calls)
    assert all(0.0 <= c["ci95"][0] <= c["exact"] <= c["ci95"][1] <= 1.0 and c["n"] > 0 for c in calls.values())
    assert "each call alone" in printed
    nogate = next(r for r in ly["rows"] if r["system"] == "lychee-nogate")
    assert nogate["blocks_read"] == nogate["blocks_total"] > 1
    # The reasoner trained on every kind of call, from the CPT compressor.
    metrics = [json.loads(line) for line in (out / "lychee" / "metrics.jsonl").read_text().splitlines()]
    kinds = {k for m in metrics for k in m.get("task_loss", {})}
    assert kinds == {"lychee_update", "memagent_update", "final_answer", "full_context"}
    assert ly["config"]["compressor"]["init_from"].endswith("cpt/compressor") and ly["settings"]["eval_questions"] == 4
    assert (out / "lychee" / "gate").is_dir() and (out / "lychee" / "eval.md").is_file()
    assert "MemAgent / LycheeMemory at 96 tokens" in printed and "| lychee-nogate |" in printed
    # The stage's settings reach the reasoner's records (the smoke preset's, not the defaults).
    assert "-L96-b32-c32-" in ly["config"]["data"]["trace_file"] and calls["final_answer"]["n"] == 2
    # Rerunning the folder with other settings would mix two runs: refused, nothing changed.
    before = (out / "lychee" / "summary.json").read_text()
    assert main(["demo", "--preset", "smoke", "--stage", "lychee", "lychee.hops=2",
                 f"out_dir={json.dumps(str(out / 'lychee'))}"]) == 2
    assert "other settings (hops 1 -> 2)" in capsys.readouterr().err
    assert (out / "lychee" / "summary.json").read_text() == before
    assert main(["demo", "--preset", "smoke", "--stage", "lychee", "lychee.bogus=1"]) == 2
    assert "unknown lychee option" in capsys.readouterr().err
    assert main(["demo", "--preset", "smoke", "--stage", "lychee",
                 f"out_dir={json.dumps(str(tmp_path / 'nowhere' / 'lychee'))}"]) == 2
    assert "continues from the CPT demo" in capsys.readouterr().err


def test_presets_of_other_models_keep_their_own_folders():
    """A smoke run in runs/demo/ would be resumed by the real demo (another model and tokenizer): the smoke and small
    presets live under runs/demo-<preset>/, each stage continuing from its own preset's previous stage."""
    cfg, _ = make_config("smoke", "cpt")
    assert cfg.run.out_dir == "runs/demo-smoke/cpt"
    lychee, _ = make_config("smoke", "lychee")
    assert lychee.run.out_dir == "runs/demo-smoke/lychee"
    assert lychee.compressor.init_from == "runs/demo-smoke/cpt/compressor"
    assert make_config("tiny", "sft")[0].compressor.init_from == "runs/demo/cpt/compressor"
    assert make_config("smoke", "cpt", ["out_dir=elsewhere/cpt"])[0].run.out_dir == "elsewhere/cpt"


def test_demo_data_never_overwrites_a_users_folder(tmp_path):
    """The recipes write their corpus to <out_dir>/../data; a folder there holding files the demo did not write is
    refused, its files untouched (it used to be overwritten when any demo file was missing)."""
    from memcomp.demo.data import prepare_demo_data

    (tmp_path / "data").mkdir()
    mine = tmp_path / "data" / "train.jsonl"
    mine.write_text('{"text": "my own corpus"}\n')
    cfg, _ = make_config("smoke", "cpt", [f"out_dir={json.dumps(str(tmp_path / 'out'))}"])
    with pytest.raises(FileExistsError, match="train.jsonl, which the demo data did not write"):
        prepare_demo_data(cfg)
    assert mine.read_text() == '{"text": "my own corpus"}\n'
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["train.jsonl"]
    # The demo's own folder is filled in and reused.
    cfg, _ = make_config("smoke", "cpt", [f"out_dir={json.dumps(str(tmp_path / 'demo' / 'out'))}"])
    prepare_demo_data(cfg)
    (tmp_path / "demo" / "data" / "qa_train.jsonl").unlink()
    prepare_demo_data(cfg)
    assert (tmp_path / "demo" / "data" / "qa_train.jsonl").is_file()
