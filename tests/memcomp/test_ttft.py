"""The TTFT suite runs end to end on a CPU (tiny config) and reports what the paper's Table 7 reports."""

import json

import pytest

from memcomp.cli import main
from memcomp.ttft import TTFTConfig, format_table, parse_lengths, run_ttft


def test_parse_lengths():
    assert parse_lengths("4k, 8k,120k") == (4096, 8192, 122880)
    assert parse_lengths("256") == (256,)
    for bad in ("", "4q", "0", "-1k"):
        with pytest.raises(ValueError):
            parse_lengths(bad)


def test_run_ttft_tiny_reports_every_case():
    cfg = TTFTConfig(model_config="tiny", lengths=(100, 300), warmup=1, runs=3, device="cpu", dtype="float32")
    res = run_ttft(cfg, log=lambda _: None)
    assert [r["context"] for r in res["rows"]] == [100, 300]
    for r in res["rows"]:
        n = -(-r["context"] // 16)
        assert r["chunks"] == n
        assert r["positions"] == {"full": r["context"] + 32, "per_embedding": 3 * n + 32, "per_block": n + 2 + 32}
        assert r["effective_ratio"]["per_block"] > r["effective_ratio"]["per_embedding"] > 1
        for case in ("full", "per_embedding", "per_block", "end_to_end", "plain_same_positions"):
            t = r[case]  # the benchmarks' timer: exactly `runs` timed runs, mean, median and p20/p80
            assert t["runs"] == len(t["runs_ms"]) == 3 and t["warmup"] == 1 and t["clock"] == "host clock"
            assert min(t["runs_ms"]) <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] <= max(t["runs_ms"])
            assert t["mean_ms"] == pytest.approx(sum(t["runs_ms"]) / 3) and t["median_ms"] > 0
        assert r["per_embedding"]["speedup_vs_full"] > 0 and r["memory_path_overhead"] > 0
    table = format_table(res)
    assert table.splitlines()[0].startswith("| context | TTFT full (ms) | TTFT ours (ms) | speedup |")
    assert "cpu" in table and "commit" in table


def test_cli_writes_json_table_and_plot(tmp_path, capsys):
    assert main(["bench", "ttft", "--model-config", "tiny", "--lengths", "64", "--runs", "1", "--warmup", "0",
                 "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path)]) == 0
    files = {p.suffix: p for p in tmp_path.iterdir()}
    assert set(files) == {".json", ".md", ".png"}
    data = json.loads(files[".json"].read_text())
    assert {"gpu", "torch", "triton", "cuda", "transformers", "commit", "date"} <= set(data["meta"])
    assert data["config"]["runs"] == 1 and data["rows"][0]["context"] == 64
    assert main(["bench", "ttft", "--model-config", "huge", "--device", "cpu"]) == 2
    assert "unknown model config" in capsys.readouterr().err


def test_partial_results_are_written_after_each_length(tmp_path):
    """A run cut off by a time limit leaves the lengths it finished."""
    from memcomp.ttft import write_outputs

    cfg = TTFTConfig(model_config="tiny", lengths=(64, 128, 256), warmup=0, runs=1, device="cpu", dtype="float32",
                     end_to_end=False)
    seen = []

    def on_row(partial):
        seen.append([r["context"] for r in partial["rows"]])
        paths = write_outputs(partial, str(tmp_path), with_plot=False)
        assert "PARTIAL" in open(paths["table"]).read()
        assert json.load(open(paths["json"]))["complete"] is False

    res = run_ttft(cfg, log=lambda _: None, on_row=on_row)
    assert seen == [[64], [64, 128]]
    assert res["complete"] is True and "PARTIAL" not in format_table(res)
    final = write_outputs(res, str(tmp_path), with_plot=False)  # replaces the partial files of the same run
    assert json.load(open(final["json"]))["complete"] is True and len(list(tmp_path.iterdir())) == 2
