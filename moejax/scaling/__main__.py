"""`python -m moejax.scaling {fit,optimal} ...`; see moejax/scaling/cli.py."""
import sys

from moejax.scaling.cli import main

sys.exit(main())
