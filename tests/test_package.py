"""The installed distribution: one top-level import, the Triton kernels inside it, a backend report."""
import importlib.metadata as md

import pytest

import espo


def test_public_api_is_importable():
    for name in espo.__all__:
        assert getattr(espo, name) is not None, name
    info = espo.backends()
    assert set(info) == {"torch", "triton", "cuda"} and info["torch"].available
    for b in info.values():
        assert b.available or b.reason, f"{b.name} is unavailable without a reason"


def test_distribution_installs_only_espo():
    # RECORD lists what pip installed; an in-tree egg-info from a build lists the sources instead.
    records = [d.read_text("RECORD") for d in md.distributions(name="espo-rl") if d.read_text("RECORD")]
    if not records:
        pytest.skip("espo-rl is not installed (pip install .)")
    files = [line.split(",")[0] for line in records[0].splitlines() if line]
    tops = {f.split("/")[0] for f in files if f.endswith(".py")}
    assert tops == {"espo"}, f"top-level modules installed: {tops}"
    assert "espo/kernels/sample.py" in files
