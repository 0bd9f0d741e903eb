"""The installed distribution: one top-level import, the Triton kernels inside it, a backend report."""
import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

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
    if any("__editable__" in f for f in files):
        pytest.skip("an editable install (pip install -e): its RECORD lists a path finder, not the package")
    tops = {f.split("/")[0] for f in files if f.endswith(".py")}
    assert tops == {"espo"}, f"top-level modules installed: {tops}"
    assert "espo/kernels/sample.py" in files


REPO = Path(__file__).resolve().parent.parent


def test_the_checkout_never_shadows_the_kernels_distribution():
    """transformers >= 5.25 imports the ``kernels`` distribution; the checkout's kernels/ folder must not win,
    even from the repository root (where ``python -m pytest`` and scripts put the root first on sys.path)."""
    assert not (REPO / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder a regular package that shadows the `kernels` distribution"
    )
    probe = (
        "import importlib.util, json, espo.kernels.sample as k\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps([k.__file__, spec.origin if spec else None]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(ours).resolve().parent.name == "kernels" and Path(ours).name == "sample.py"
    try:
        md.distribution("kernels")
    except md.PackageNotFoundError:  # then `kernels` is at most the checkout's namespace portion: no module file
        assert theirs is None, theirs
    else:
        # the distribution's own file (a venv may well live inside the checkout, as .venv/), not the kernels/ folder
        assert theirs is not None and not Path(theirs).resolve().is_relative_to((REPO / "kernels").resolve()), theirs
