"""memcomp's Triton kernels (installed as ``memcomp.kernels``), one op per file, each with its eager
reference and a ``torch.library`` registration under the ``memcomp::`` namespace. Never imports
transformers."""

if __name__ == "kernels":  # pragma: no cover - exercised in a subprocess by tests/test_packaging.py
    # Python was started in a memcomp checkout, so this folder is on sys.path as top-level `kernels` -- the
    # name of Hugging Face's `kernels` package, which bitsandbytes and transformers import. Step aside:
    # load the real one if it is installed, else fail exactly like a missing package.
    import importlib
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    del sys.modules["kernels"]
    _saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _checkout]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")
    except ImportError as _exc:
        raise ModuleNotFoundError("No module named 'kernels' (the 'kernels' folder of this memcomp checkout is "
                                  "memcomp.kernels, not Hugging Face's kernels package)", name="kernels") from _exc
    finally:
        sys.path[:] = _saved
else:
    from memcomp.kernels.backend import BACKENDS, current_backend, use_backend
    from memcomp.kernels.segment_mean_proj import segment_mean_proj, segment_mean_proj_reference

    __all__ = ["BACKENDS", "current_backend", "use_backend", "segment_mean_proj", "segment_mean_proj_reference"]
