"""``python -m nomad_pipeline.devagent``: run the dev agent (``nomad-pipeline dev-nomad``)."""

from __future__ import annotations

import sys

from nomad_pipeline.devagent.server import main

# The command line lives in server.py; importing it from here keeps working.
__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
