"""``python -m nomad_pipeline.runner``: the same as the ``nomad-pipeline-runner`` script."""

from __future__ import annotations

import sys

from nomad_pipeline.runner.main import main

sys.exit(main())
