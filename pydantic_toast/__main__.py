"""``python -m pydantic_toast``: the operators' command-line tool (see `pydantic_toast.cli`)."""

import sys

from pydantic_toast.cli import main

sys.exit(main())
