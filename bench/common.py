"""What every benchmark and study (studies/common.py) records beside its numbers: the machine, the versions, the
date and the command."""
from __future__ import annotations

import datetime
import importlib
import platform
import sys
from pathlib import Path

import torch

# A benchmark run from a checkout measures that checkout's code, not an older espo installed in site-packages
# (python puts bench/, not the repository root, on sys.path). Every bench script imports this module first.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def environment(device: str, bandwidth: float | None = None, **extra) -> dict:
    """The run's environment: device name, torch/triton/transformers/flash-attn versions, espo's backends."""
    env = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    for name in ("triton", "transformers", "flash_attn"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception:  # an optional peer that is missing or broken is recorded as absent
            env[name] = None
    try:
        import espo

        env["backends"] = {k: v.available for k, v in espo.backends().items()}
    except ImportError:
        pass
    if bandwidth:
        env["copy_bandwidth_TBps"] = bandwidth / 1e12
    return env | extra


NOTES = "## About these numbers"


def write_report(path: Path, text: str) -> None:
    """Write a results .md, carrying over the hand-written "About these numbers" section of the report it replaces
    (dates, loads and caveats that README links to), marked for a second look; the rest is the script's."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if NOTES in old and NOTES not in text:
        start = old.index(NOTES)
        end = old.find("\n## ", start + len(NOTES))
        notes = old[start:] if end < 0 else old[start:end + 1]
        carried = "(Carried over from the report this run replaced: check that it still holds for these numbers.)"
        notes = notes.rstrip("\n").removesuffix(carried).rstrip("\n")  # carried once, however many reruns
        text = text.rstrip("\n") + "\n\n" + notes + "\n\n" + carried + "\n"
    path.write_text(text)
