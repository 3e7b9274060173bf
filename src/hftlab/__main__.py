"""``python -m hftlab`` (and ``accelerate launch -m hftlab run …``)."""
import sys

from .cli import main

sys.exit(main())
