"""Import a host library for its tests, or skip them where it is absent (the main suite's environment)."""
from __future__ import annotations

import importlib
import os

import pytest


def require(host: str, *modules: str) -> None:
    """Import ``modules`` (the host's and espo's adapter); skip the calling test module if one fails.

    ``scripts/host_envs.sh`` sets ESPO_REQUIRE_HOST to the host whose env it built: there a failed import
    is an error, not a skip.
    """
    try:
        for name in modules:
            importlib.import_module(name)
    except Exception as err:
        if os.environ.get("ESPO_REQUIRE_HOST") == host:
            raise
        pytest.skip(f"{host} is not installed here ({err!r:.120}); `bash scripts/host_envs.sh {host}` runs these",
                    allow_module_level=True)
