"""The transformers version must be in the tested range (and pyproject.toml must say the same range)."""

import os
import re

from memcomp._compat import TRANSFORMERS_REQUIREMENT, transformers_version_problem

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_transformers_in_tested_range():
    problem = transformers_version_problem()
    assert problem is None, (f"\n\n*** {problem} ***\nmemcomp wraps transformers' models by composition and relies "
                             "on their module layout; run the suite in the tested range or widen it after testing.")


def test_pyproject_states_the_same_range():
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        text = f.read()
    assert re.search(rf'"{re.escape(TRANSFORMERS_REQUIREMENT)}"', text), (
        f"pyproject.toml must pin {TRANSFORMERS_REQUIREMENT}")
