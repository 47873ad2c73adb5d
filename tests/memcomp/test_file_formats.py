"""Files memcomp reads back refuse what they do not implement instead of ignoring it: a format version from
another memcomp, a compressor config that disagrees with its projection file (the adapter files of
``import_peft`` are covered in test_peft_interop.py)."""

import json

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from testutil import TEXTS

from memcomp import MemoryCompressor
from memcomp.memory import Memory, MemoryFileError


def test_compressor_of_another_format_version_is_refused(make_compressor, tmp_path):
    make_compressor().save_pretrained(tmp_path / "c")
    marker = tmp_path / "c" / "memcomp_config.json"
    meta = json.loads(marker.read_text())
    assert meta["format_version"] == 1
    MemoryCompressor.from_pretrained(tmp_path / "c")  # as written, it loads
    marker.write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(ValueError, match="format_version 2"):
        MemoryCompressor.from_pretrained(tmp_path / "c")


def test_compressor_config_and_projection_file_must_agree(make_compressor, tmp_path):
    make_compressor().save_pretrained(tmp_path / "c")
    marker = tmp_path / "c" / "memcomp_config.json"
    meta = json.loads(marker.read_text())
    assert meta["config"]["projection_bias"] is True
    meta["config"]["projection_bias"] = False
    marker.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="projection_bias=False .* has a bias"):
        MemoryCompressor.from_pretrained(tmp_path / "c")


def test_memory_of_another_format_version_is_refused(make_compressor, tmp_path):
    path = tmp_path / "m.safetensors"
    make_compressor().encode(TEXTS[0]).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, emb = f.metadata(), f.get_tensor("embeddings")
    assert meta["format_version"] == "1"
    Memory.load(path)  # as written, it loads
    save_file({"embeddings": emb}, str(path), metadata={**meta, "format_version": "2"})
    with pytest.raises(MemoryFileError, match="format_version '2'"):
        Memory.load(path)
