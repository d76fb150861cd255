"""Entry point: python -m factorlab."""
import sys

from .cli import main

sys.exit(main())
