"""scripts/make_tiny_model.py: where it writes, what its card says, how it says that a model missed its band."""

import json
import subprocess
import sys
from pathlib import Path

from espo.engine.models import builtin_card, builtin_model_path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_model.py"
SMALLEST = [
    "--train-steps",
    "2",
    "--batch-size",
    "4",
    "--warmup",
    "1",
    "--hidden",
    "16",
    "--layers",
    "1",
    "--heads",
    "2",
    "--intermediate",
    "32",
    "--eval-n",
    "4",
    "--rounds",
    "1",
    "--threads",
    "1",
]


def script(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_shows_out_and_the_exit_codes_and_keeps_each_example_on_its_lines():
    done = script("--help")
    assert done.returncode == 0
    text = done.stdout
    assert "--out DIR" in text and "required" in text and "--rebuild-shipped" in text
    assert "Exit codes: 0" in text and "2 a usage error, or the rate missed the band" in text
    lines = text.splitlines()
    assert any(line.strip() == "python scripts/make_tiny_model.py --out tiny-model" for line in lines), text
    big = next(line for line in lines if "--out /tmp/arith-big" in line)
    assert big.rstrip().endswith("\\") and "--hidden 384" not in big  # the example's second line is its own


def test_out_is_required_and_the_shipped_folder_needs_rebuild_shipped(tmp_path):
    before = {p.name: p.read_bytes() for p in builtin_model_path().iterdir()}
    done = script(*SMALLEST)
    assert done.returncode == 2 and "--out DIR is required" in done.stderr, done.stderr
    done = script("--out", builtin_model_path(), *SMALLEST)
    assert done.returncode == 2 and "--rebuild-shipped" in done.stderr and "espo/assets" in done.stderr, done.stderr
    done = script("--out", tmp_path / "m", "--rebuild-shipped", *SMALLEST)
    assert done.returncode == 2 and "shipped model's folder only" in done.stderr, done.stderr
    assert {p.name: p.read_bytes() for p in builtin_model_path().iterdir()} == before
    assert not (tmp_path / "m").exists()


def test_a_model_that_misses_its_band_is_written_with_its_own_card_and_one_line_exit_2(tmp_path):
    done = script("--out", tmp_path / "mine", *SMALLEST, "--band-low", "0.99", "--band-high", "1.0")
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, (done.returncode, done.stderr)
    assert "missed the band [0.99, 1.0]" in err[0] and f"written to {tmp_path / 'mine'} anyway" in err[0], err
    card = json.loads((tmp_path / "mine" / "card.json").read_text())
    shipped = builtin_card()
    assert card["name"] == "mine" and card["name"] != shipped["name"]
    assert card["description"] != shipped["description"] and "Not the model espo ships" in card["description"]
    assert card["success"]["in_band"] is False
