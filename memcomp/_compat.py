"""Versions memcomp is tested against (pyproject.toml states the same range; a test keeps them equal)."""

from __future__ import annotations

TRANSFORMERS_MIN = "5.0"
TRANSFORMERS_MAX_EXCLUSIVE = "6"
TRANSFORMERS_REQUIREMENT = f"transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX_EXCLUSIVE}"


def transformers_version_problem() -> str | None:
    """None when the installed transformers is in the tested range, else what is wrong."""
    from packaging.version import Version

    try:
        import transformers
    except ImportError:
        return "transformers is not installed"
    v = Version(transformers.__version__)
    if not (Version(TRANSFORMERS_MIN) <= v < Version(TRANSFORMERS_MAX_EXCLUSIVE)):
        return (f"transformers {transformers.__version__} is outside memcomp's tested range "
                f"{TRANSFORMERS_REQUIREMENT}")
    return None
