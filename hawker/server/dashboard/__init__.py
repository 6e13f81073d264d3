"""The live dashboard (``GET /dashboard``): static files shipped in the package, no network at run time.

``static/`` holds the page, its script and style, the panel definitions it
shares with the Grafana dashboard (``panels.json``; tests/server/test_dashboard.py
keeps the two in step), and uPlot 1.6.32 (MIT), vendored unchanged from the
npm registry (``npm pack uplot@1.6.32``; its ``dist/uPlot.iife.min.js``,
``dist/uPlot.min.css`` and ``LICENSE`` as ``uPlot.LICENSE``).
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
INDEX = STATIC_DIR / "index.html"
PANELS = STATIC_DIR / "panels.json"
