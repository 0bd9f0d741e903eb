"""The package's imports (scripts/draw_imports.py): no circles, no private names across modules, arrows only go
down the layers, docs/imports.md as the script draws it, and espo 0.1's module paths still importable."""
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import espo

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("draw_imports", ROOT / "scripts" / "draw_imports.py")
draw_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(draw_imports)


def test_no_circles_private_names_or_upward_arrows():
    assert draw_imports.findings() == []


def test_the_committed_drawing_is_current():
    assert draw_imports.DRAWING.read_text() == draw_imports.drawing(), (
        "docs/imports.md is stale: run python scripts/draw_imports.py --write")


def test_every_module_has_a_layer_and_every_layer_a_module():
    modules = draw_imports.module_files()
    assert "espo.kernels.sample" in modules and "espo.engine.sequence" in modules
    used = {draw_imports.layer_of(m) for m in modules}
    assert used == set(range(len(draw_imports.LAYERS)))


def test_the_checks_find_what_they_look_for(tmp_path, monkeypatch):
    """The checker itself: a circle, a private import and an upward arrow planted in a copy are each reported."""
    pkg = tmp_path / "espo"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "engine").mkdir()
    (tmp_path / "kernels").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "ops" / "a.py").write_text("from espo.engine.b import thing\n")  # up a layer, and a circle with b
    (pkg / "engine" / "b.py").write_text("def f():\n    from espo.ops.a import _hidden\n")  # private, in a function
    monkeypatch.setattr(draw_imports, "ROOT", tmp_path)
    found = "\n".join(draw_imports.findings())
    assert "import circle: espo.engine.b <-> espo.ops.a" in found
    assert "imports the private _hidden of espo.ops.a" in found
    assert "espo.ops.a (ops) imports espo.engine.b (engine), a layer above it" in found


@pytest.mark.parametrize("old, new", sorted(espo.MOVED_MODULES.items()))
def test_old_module_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_paths_work_in_a_fresh_interpreter():
    """``from espo.config import TrainConfig`` before anything else has imported the new path."""
    code = ("from espo.config import TrainConfig; import espo.stopper, espo.rl.config as c; "
            "assert TrainConfig is c.TrainConfig and espo.stopper.ESPOConfig is espo.ESPOConfig")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_an_old_path_never_hides_a_public_name():
    """``espo.backends`` was a module and is the public function: importing the old module path keeps the function."""
    import espo.backends  # noqa: F401
    from espo.backends import BackendUnavailable

    assert callable(espo.backends) and "torch" in espo.backends()
    assert BackendUnavailable is espo.ops.backends.BackendUnavailable
