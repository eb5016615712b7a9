"""``python -m meshcast ...``: the `meshcast` command (see `meshcast.cli`)."""

import sys

from meshcast.cli import main

sys.exit(main())
