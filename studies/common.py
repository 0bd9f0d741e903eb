"""What the studies share beside espo.stats: their results folder and the record of the machine they ran on.

A study run as ``python3 studies/x.py`` first puts the repository root on sys.path (Python puts studies/ there),
so that it measures this checkout's espo, not an older one installed in site-packages, and imports this module.
"""
from __future__ import annotations

from pathlib import Path

from bench.common import (  # one record of machine, versions, date and command for benchmarks and studies
    environment,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "studies" / "results"

__all__ = ["REPO", "RESULTS", "environment", "write_report"]
