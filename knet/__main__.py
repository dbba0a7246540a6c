"""``python -m knet ...``: the ``knet`` command (e.g. in a Ray job that ships its code)."""

import sys

from knet.cli import main

sys.exit(main())
