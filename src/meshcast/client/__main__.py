"""``python -m meshcast.client user|flood|status ...``: the client commands of `meshcast`."""

import sys

from meshcast.client.cli import main

sys.exit(main())
