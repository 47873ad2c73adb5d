"""Run metadata: the commit, device and run mode every result is labelled with."""

import subprocess

import pytest
import torch

from memcomp import runinfo


def test_commit_from_git_then_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMCOMP_COMMIT", "abc1234")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=runinfo._REPO, capture_output=True,
                          text=True).stdout.strip()
    if head:  # a checkout: git wins over a possibly stale variable
        assert runinfo.git_commit().split("-")[0] == head
    monkeypatch.setattr(runinfo, "_REPO", str(tmp_path))  # an exported copy of the tree, without .git
    assert runinfo.git_commit() == "abc1234"
    monkeypatch.delenv("MEMCOMP_COMMIT")
    assert runinfo.git_commit() == "unknown"


def test_metadata_says_how_the_run_executed(monkeypatch):
    """Every results table is headed by the run mode: a CPU run must say its numbers are smoke-run numbers."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    meta = runinfo.run_metadata("cpu")
    assert {"gpu", "mode", "torch", "triton", "cuda", "transformers", "python", "commit", "date"} <= set(meta)
    assert meta["gpu"].startswith("cpu") and "Triton's interpreter" in meta["mode"]
    assert "say nothing about GPU performance" in meta["mode"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "only the eager PyTorch references run" in runinfo.run_mode("cpu")


def test_bad_devices_are_rejected():
    for bad in ("tpu", "meta", "", "cuda:x"):
        with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
            runinfo.check_device(bad)
    if not torch.cuda.is_available():  # no silent CPU label for a CUDA run
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            runinfo.run_metadata("cuda")


@pytest.mark.gpu
def test_cuda_metadata_names_the_gpu():
    meta = runinfo.run_metadata("cuda")
    assert meta["gpu"] == torch.cuda.get_device_name() and meta["gpu"] in meta["mode"]
    assert "compiled" in meta["mode"] and meta["cuda"] == torch.version.cuda
    with pytest.raises(ValueError, match="does not exist"):
        runinfo.check_device(f"cuda:{torch.cuda.device_count()}")
