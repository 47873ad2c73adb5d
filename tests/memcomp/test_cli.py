"""The command line answers --help and --version at once: neither imports torch."""

import subprocess
import sys

import pytest

from memcomp import __version__


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["demo", "--help"], ["bench", "ttft", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    code = (f"import sys\nfrom memcomp.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if argv == ["--version"]:
        assert out.stdout.strip() == f"memcomp {__version__}"
    else:
        assert "usage: memcomp" in out.stdout
