"""`python -m orchestrator.report NAME`: see cli.py."""
import sys

from .cli import main

sys.exit(main())
