"""``python -m pydantic_toast``: the operators' command-line tool (see `pydantic_toast._cli`)."""

import sys

from pydantic_toast._cli import main

sys.exit(main())
