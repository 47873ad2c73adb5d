"""Installed import names: ours live under memcomp.*; nothing generic (kernels, trainers) is exposed.

Hugging Face's own `kernels` package is imported by transformers and bitsandbytes when present; a
top-level `kernels` of ours would shadow it or be shadowed by it.
"""

import json
import os
import shutil
import subprocess
import sys
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import importlib.util, json, memcomp.kernels, memcomp.trainers, memcomp.fused
specs = {name: importlib.util.find_spec(name) for name in ("kernels", "trainers", "bench")}
print(json.dumps({
    "kernels_file": memcomp.kernels.__file__,
    "trainers_file": memcomp.trainers.__file__,
    "op": memcomp.fused.segment_mean_proj.__module__,
    "generic": {k: (s.origin if s else None) for k, s in specs.items()},
}))
"""


def _probe(python: str, cwd: str, env_extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    out = subprocess.run([python, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_ours(info: dict, root: str) -> None:
    assert os.path.realpath(info["kernels_file"]).startswith(os.path.realpath(root)), info
    assert info["op"] == "memcomp.kernels.segment_mean_proj"
    for name, origin in info["generic"].items():
        assert origin is None or not os.path.realpath(origin).startswith(os.path.realpath(REPO)), (
            f"top-level `{name}` resolves to our files: {origin}")
        assert origin is None or "memcomp" not in origin, f"top-level `{name}` resolves to {origin}"


def _copy_repo(dst: str) -> str:
    ignore = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    "results")
    shutil.copytree(REPO, dst, ignore=ignore)
    return dst


def test_dev_extra_reference_libraries_are_installed():
    """The tests compare against bitsandbytes and peft and skip without them on a bare GPU machine; where
    the dev extra is installed (here, CI) they must be importable, so nothing is skipped silently."""
    import importlib

    for name in ("bitsandbytes", "peft", "pytest_benchmark", "matplotlib", "liger_kernel"):
        importlib.import_module(name)


def test_test_process_sees_no_generic_names():
    """Inside the test run too: neither the repo's kernels/ nor tests/kernels is importable as `kernels`
    (transformers probes for Hugging Face's `kernels` package with find_spec)."""
    import importlib.util

    for name in ("kernels", "trainers", "memcomp"):
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        locations = list(spec.submodule_search_locations or []) + [spec.origin or ""]
        assert not any(os.path.join(REPO, "tests") in str(p) for p in locations), (name, locations)
        if name != "memcomp":
            assert not any(os.path.realpath(str(p)).startswith(REPO) for p in locations), (name, locations)


def test_current_install_exposes_only_memcomp_names(tmp_path):
    """The environment the suite runs in (editable by scripts/setup.sh), from a directory outside the repo."""
    import memcomp

    info = _probe(sys.executable, str(tmp_path))
    _assert_ours(info, os.path.dirname(os.path.dirname(os.path.realpath(memcomp.__file__))))


def test_the_install_covers_every_module_of_the_checkout():
    """scripts/setup.sh installs in setuptools' strict editable mode (a tree of links): a module added to the
    checkout afterwards is not importable until the script runs again. Say so, rather than fail elsewhere."""
    import importlib.util

    import memcomp

    if os.path.realpath(memcomp.__file__) != os.path.join(os.path.realpath(REPO), "memcomp", "__init__.py"):
        pytest.skip("memcomp is not installed from this checkout")
    missing = []
    for folder, package in (("memcomp", "memcomp"), ("kernels", "memcomp.kernels"), ("trainers", "memcomp.trainers")):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            rel = os.path.relpath(root, os.path.join(REPO, folder))
            if "__pycache__" in rel or not os.path.isfile(os.path.join(root, "__init__.py")):
                continue
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py") and f != "__init__.py":
                    name = f"{prefix}.{f[:-3]}"
                    if importlib.util.find_spec(name) is None:
                        missing.append(name)
    assert not missing, f"not importable from the install: {missing}; run `bash scripts/setup.sh` again"


def test_from_the_repo_root_generic_names_step_aside():
    """`python` started in the checkout puts it on sys.path: `import kernels` (as transformers and
    bitsandbytes do) must not get our code -- Hugging Face's package if installed, else an empty shell that
    transformers reads as not installed -- and transformers' models and memcomp.kernels must still import."""
    probe = ("import importlib, json\n"
             "res = {}\n"
             "for name in ('kernels', 'trainers'):\n"
             "    try:\n"
             "        m = importlib.import_module(name)\n"
             "        res[name] = {'file': getattr(m, '__file__', None), 'path': list(getattr(m, '__path__', [])),\n"
             "                     'ours': hasattr(m, 'segment_mean_proj') or hasattr(m, 'backend')}\n"
             "    except ImportError as e:\n"
             "        res[name] = 'ImportError: ' + str(e)\n"
             "from transformers import Qwen2ForCausalLM  # transformers probes for HF's kernels on import\n"
             "import bitsandbytes\n"
             "import memcomp.kernels, memcomp.trainers\n"
             "res['memcomp.kernels'] = memcomp.kernels.segment_mean_proj.__module__\n"
             "print(json.dumps(res))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["trainers"].startswith("ImportError")
    k = res["kernels"]
    if isinstance(k, dict):
        assert not k["ours"], k
        for p in [k["file"], *k["path"]]:
            assert p is None or not os.path.realpath(p).startswith(REPO), k
    assert res["memcomp.kernels"] == "memcomp.kernels.segment_mean_proj"
    assert "kernels/__init__.py" not in out.stderr, out.stderr  # bitsandbytes once imported our folder


def test_regular_install(tmp_path):
    src = _copy_repo(str(tmp_path / "src"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(target), src], check=True, capture_output=True, timeout=600)
    assert (target / "memcomp" / "kernels" / "segment_mean_proj.py").is_file()
    assert not (target / "kernels").exists() and not (target / "trainers").exists()
    info = _probe(sys.executable, str(tmp_path), {"PYTHONPATH": str(target)})
    _assert_ours(info, str(target))


def test_editable_install_imports_from_the_folder_holding_the_checkout(tmp_path):
    """The set-up's editable install (strict mode), of a checkout in a folder named memcomp, probed from the
    folder that holds it: there a default editable install gave `ImportError: cannot import name
    'CompressorConfig' from 'memcomp' (unknown location)` (the checkout's folder as a namespace package)."""
    src = _copy_repo(str(tmp_path / "memcomp"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = str(env_dir / "bin" / "python")
    # pip from the outer environment installs into the venv via --prefix-free `--python`.
    res = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                          "--no-build-isolation", "-q", "-e", src, "--config-settings", "editable_mode=strict"],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "no such option: --python" in res.stderr:
        pytest.skip("pip too old for --python")
    assert res.returncode == 0, res.stderr
    info = _probe(python, str(tmp_path))
    _assert_ours(info, src)
    out = subprocess.run([python, "-c", "from memcomp import CompressorConfig; print(CompressorConfig().chunk_size)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "16", out.stderr
    # And from inside the checkout, where ./memcomp (without kernels/ and trainers/) comes first on sys.path.
    out = subprocess.run([python, "-c", "import memcomp.fused, memcomp.trainers.cpt; print('ok')"], cwd=src,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    with open(os.path.join(REPO, "scripts", "setup.sh")) as f:
        assert "editable_mode=strict" in f.read(), "the test must install as scripts/setup.sh does"
