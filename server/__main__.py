"""``python -m stoker.server``: the ``stoker`` command."""

import sys

from stoker.server.cli import main

sys.exit(main())
