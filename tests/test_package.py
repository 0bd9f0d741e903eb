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
    try:
        files = md.files("espo-rl")
    except md.PackageNotFoundError:
        pytest.skip("espo-rl is not installed (pip install .)")
    tops = {f.parts[0] for f in files if f.suffix == ".py"}
    assert tops == {"espo"}, f"top-level modules installed: {tops}"
    assert any(f.parts[:2] == ("espo", "kernels") and f.name == "sample.py" for f in files)
