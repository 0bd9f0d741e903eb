"""``CharTokenizer``: one token per character, what the shipped tiny model reads (saved as ``char_tokenizer.json``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "TOKENIZER_FILE",
    "CharTokenizer",
]

TOKENIZER_FILE = "char_tokenizer.json"


class CharTokenizer:
    """One token per character of a fixed alphabet, plus ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``.

    Ids 0-3 are the special tokens (in that order), then the alphabet in the given order.
    ``encode`` raises ``ValueError`` on a character outside the alphabet unless ``strict=False``,
    in which case it becomes ``<unk>``. It mimics the few parts of a transformers tokenizer a
    trainer touches (``pad_token_id``, ``eos_token_id``, ``bos_token_id``, ``__call__``,
    ``batch_decode``, ``len``) but does not depend on the tokenizers library.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty alphabet")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"alphabet entries must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("alphabet has repeated characters")
        self.chars: tuple[str, ...] = tuple(chars)
        self._id = {c: i + len(self.SPECIALS) for i, c in enumerate(self.chars)}

    # sizes and ids -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.chars)

    def __len__(self) -> int:
        return self.vocab_size

    # encode / decode ---------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, strict: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_bos else []
        for c in text:
            i = self._id.get(c)
            if i is None:
                if strict:
                    raise ValueError(f"character {c!r} is not in the tokenizer's alphabet {''.join(self.chars)!r}")
                i = self.unk_token_id
            ids.append(i)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True,
               stop_at_eos: bool = False) -> str:
        """Text of ``ids``. ``stop_at_eos`` drops the first ``<eos>`` and everything after it."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        n_special = len(self.SPECIALS)
        for i in ids:
            i = int(i)
            if stop_at_eos and i == self.eos_token_id:
                break
            if i < n_special:
                if not skip_special_tokens:
                    out.append(self.SPECIALS[i])
            elif i < self.vocab_size:
                out.append(self.chars[i - n_special])
            else:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]] | torch.Tensor, skip_special_tokens: bool = True,
                     stop_at_eos: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, stop_at_eos=stop_at_eos) for s in sequences]

    def batch_encode(self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False,
                     padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` as long tensors, padded with ``<pad>`` (left by default, for generation)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            if not r:
                continue
            sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[k, sl] = torch.tensor(r, dtype=torch.long)
            mask[k, sl] = 1
        return ids, mask

    def __call__(self, texts: str | Sequence[str], add_bos: bool = True, padding_side: str = "left",
                 return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        if return_tensors != "pt":
            raise ValueError("CharTokenizer only returns torch tensors (return_tensors='pt')")
        if isinstance(texts, str):
            texts = [texts]
        ids, mask = self.batch_encode(texts, add_bos=add_bos, padding_side=padding_side)
        return {"input_ids": ids, "attention_mask": mask}

    # persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"type": "espo.CharTokenizer", "version": 1, "specials": list(self.SPECIALS),
                "chars": "".join(self.chars)}

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON; ``path`` is a file, or a folder that gets ``char_tokenizer.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("type") != "espo.CharTokenizer" or list(data.get("specials", [])) != list(cls.SPECIALS):
            raise ValueError(f"{path} is not an espo CharTokenizer file")
        return cls(data["chars"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(chars={''.join(self.chars)!r}, vocab_size={self.vocab_size})"
