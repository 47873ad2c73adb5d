"""memcomp's Triton kernels (installed as ``memcomp.kernels``), one op per file, each with its eager
reference and a ``torch.library`` registration under the ``memcomp::`` namespace. Never imports
transformers."""

if __name__ == "kernels":  # pragma: no cover - exercised in a subprocess by tests/test_packaging.py
    # Python was started in a memcomp checkout, so this folder is on sys.path as top-level `kernels` -- the
    # name of Hugging Face's `kernels` package, which transformers and bitsandbytes probe for. Step aside:
    # load the real one if it is installed; otherwise become an empty namespace-like shell (no __file__, no
    # __version__, no submodules), which transformers reads as "not installed" and from which
    # `from kernels import x` fails with an ordinary ImportError.
    import importlib
    import os
    import sys

    _this = sys.modules["kernels"]
    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _checkout]
    del sys.modules["kernels"]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")
    except ImportError:
        sys.modules["kernels"] = _this
        __file__ = None
        __path__ = []
    finally:
        sys.path[:] = _saved
else:
    from memcomp.kernels.backend import BACKENDS, current_backend, use_backend
    from memcomp.kernels.segment_mean_proj import segment_mean_proj, segment_mean_proj_reference

    __all__ = ["BACKENDS", "current_backend", "use_backend", "segment_mean_proj", "segment_mean_proj_reference"]
