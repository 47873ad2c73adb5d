"""The main job's pieces and a smoke run of it (the full ~10-minute run is the README's command)."""

import json

import pytest

from memcomp.cli import main
from memcomp.demo.corpus import stdlib_passages
from memcomp.demo.run import make_config, position_accuracy, rouge_l_f1


def test_corpus_is_real_text_with_a_heldout_split():
    splits = stdlib_passages()
    assert len(splits["train"]) > 500 and len(splits["heldout"]) > 50
    assert not set(splits["train"]) & set(splits["heldout"])


def test_metrics():
    assert rouge_l_f1([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l_f1([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert rouge_l_f1([], [1]) == 0.0
    assert position_accuracy([1, 2], [1, 3, 4]) == pytest.approx(1 / 3)


def test_config_rejects_unknown_keys_and_presets():
    with pytest.raises(ValueError, match="unknown demo options: stepz"):
        make_config("tiny", stepz=3)
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("huge")
    assert make_config("tiny", steps=5).steps == 5


def test_cli_rejects_bad_overrides(capsys):
    assert main(["demo", "stepz=3"]) == 2
    assert "unknown demo options" in capsys.readouterr().err


def test_demo_smoke_end_to_end(tmp_path):
    from memcomp import MemoryCompressor

    out = tmp_path / "demo"
    assert main(["demo", "--preset", "smoke", f"out_dir={json.dumps(str(out))}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["losses"]) == 6
    assert len(summary["reconstruction_losses"]) == 6 and len(summary["lm_losses"]) == 6
    assert isinstance(summary["memory_carries_information"], bool)
    for key in ("memory_token_accuracy", "control_token_accuracy", "memory_rouge_l", "control_rouge_l"):
        assert 0.0 <= summary["eval"][key] <= 1.0
    assert (out / "loss.png").stat().st_size > 1000
    comp = MemoryCompressor.from_pretrained(out / "compressor")
    assert comp.config.chunk_size == 4
