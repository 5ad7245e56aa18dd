"""The controller's HTTP API (aiohttp): native resource API, the seed's v1 API, health, metrics.

Shared state lives on the application under these typed keys (never module globals), so route
modules written elsewhere (runs, logs, webhooks; passed to ``build_api(extra_routes=...)``) read
``request.app[STORE]`` and ``request.app[LOG_ROOT]``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from nomad_pipeline.controller.metrics import ApiMetrics
from nomad_pipeline.store.interface import Store

STORE = web.AppKey("store", Store)
# ``<data-dir>/logs``: step logs live under ``runs/<namespace>/<run-id>/<step-id>/logs/``.
LOG_ROOT = web.AppKey("log_root", Path)
METRICS = web.AppKey("metrics", ApiMetrics)
# Set once the store serves reads and the controllers run; /readyz answers 503 until then.
READY = web.AppKey("ready", asyncio.Event)
# Open streams cancelled on shutdown (log follows) and shielded writes awaited on shutdown.
# Watch streams end cleanly instead, through ``watch.WATCH_STREAMS``.
WATCHES = web.AppKey[set[asyncio.Task[Any]]]("watches")
BACKGROUND = web.AppKey[set[asyncio.Task[Any]]]("background")
