"""Run metadata: the commit results are labelled with."""

import subprocess

from memcomp import runinfo


def test_commit_from_git_then_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMCOMP_COMMIT", "abc1234")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=runinfo._REPO, capture_output=True,
                          text=True).stdout.strip()
    if head:  # a checkout: git wins over a possibly stale variable
        assert runinfo.git_commit().split("-")[0] == head
    monkeypatch.setattr(runinfo, "_REPO", str(tmp_path))  # a copy of the tree without .git
    assert runinfo.git_commit() == "abc1234"
    monkeypatch.delenv("MEMCOMP_COMMIT")
    assert runinfo.git_commit() == "unknown"
