import sys

from memcomp.cli import main

sys.exit(main())
