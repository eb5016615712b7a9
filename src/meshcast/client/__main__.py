"""``python -m meshcast.client user|flood ...`` (the same commands as ``meshcast user|flood``)."""

import sys

from meshcast.client.cli import main

sys.exit(main())
