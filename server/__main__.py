"""``python -m stoker.server``: the ``stoker`` command."""

import sys

from stoker.server.tools.cli import main

sys.exit(main())
