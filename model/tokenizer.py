"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) plus Hearth's special tokens.

Design choices:
- Byte-level pre-tokenisation with no prefix space and no normaliser, so any
  UTF-8 string round-trips exactly (Chinese, emoji, code, whitespace runs).
- Special tokens are added as "special" so user text can never produce them
  by accident: `encode` splits them only when `allow_special=True` (the chat
  template), never for user content.
- The file on disk is a plain `tokenizer.json`; which ids are BOS/EOS/PAD and
  the chat markers lives in config.json (`TokenizerInfo`), not in file names.
- Whether a prompt starts with BOS is the model's rule (`TokenizerInfo.add_bos`):
  Hearth's own models do; imported ones follow their tokenizer (a Hugging Face
  post_processor, GGUF's add_bos_token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.errors import TokenizerError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END]


@dataclass
class TokenizerInfo:
    """What config.json records about the tokenizer: special tokens and the chat template."""

    bos_token: str | None = BOS
    eos_token: str | None = EOS
    pad_token: str | None = PAD
    chat_template: str = "hearth"  # "hearth" (model/chat.py) or "jinja" (imported from Hugging Face or GGUF)
    jinja_template: str | None = None
    stop_tokens: list[str] = field(default_factory=lambda: [END, EOS])
    add_bos: bool = True  # whether a prompt starts with BOS: the model's own tokenizer's rule (HF post_processor, GGUF add_bos_token)

    @classmethod
    def from_dict(cls, data: dict) -> "TokenizerInfo":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


class Tokenizer:
    """Thin wrapper: encode/decode, special ids, save/load, and training."""

    def __init__(self, backend: HFTokenizer, info: TokenizerInfo | None = None):
        self.backend = backend
        self.info = info or TokenizerInfo()
        self.bos_id = self._optional_id(self.info.bos_token)
        self.eos_id = self._optional_id(self.info.eos_token)
        self.pad_id = self._optional_id(self.info.pad_token)
        self.stop_ids = [i for i in (self._optional_id(t) for t in self.info.stop_tokens) if i is not None]

    def _optional_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"tokenizer has no token {token!r}")
        return token_id

    @property
    def adds_bos(self) -> bool:
        """Whether prompts start with BOS: the model has one and its tokenizer adds it."""
        return self.bos_id is not None and self.info.add_bos

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids; add_bos=True prepends BOS where the model's tokenizer would (`adds_bos`)."""
        if allow_special:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_plain(text)
        return ([self.bos_id] if add_bos and self.adds_bos else []) + ids

    def _encode_plain(self, text: str) -> list[int]:
        # Encode without matching special tokens: tokenizers matches added tokens
        # before the model runs, so split them out by hand and encode the pieces.
        specials = [t for t in self.backend.get_added_tokens_decoder().values() if t.content in text]
        if not specials:
            return self.backend.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for piece in _split_keep(text, [t.content for t in specials]):
            ids.extend(self._encode_without_added(piece))
        return ids

    def _encode_without_added(self, piece: str) -> list[int]:
        if self.backend.normalizer is not None:
            piece = self.backend.normalizer.normalize_str(piece)
        pre = self.backend.pre_tokenizer.pre_tokenize_str(piece) if self.backend.pre_tokenizer else [(piece, None)]
        ids: list[int] = []
        for word, _ in pre:
            ids.extend(tok.id for tok in self.backend.model.tokenize(word))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Batched, multi-threaded encoding of plain text (the trainer's data pipeline)."""
        if any(t.content in text for text in texts for t in self.backend.get_added_tokens_decoder().values()):
            return [self.encode(text) for text in texts]
        return [enc.ids for enc in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @classmethod
    def load(cls, path: str | Path, info: TokenizerInfo | None = None) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises bare Exception subclasses
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None
        return cls(backend, info)

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
        """Train a byte-level BPE on an iterator of strings (streamed, never all in memory)."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TokenizerError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials)")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, TokenizerInfo())


def _split_keep(text: str, separators: list[str]) -> list[str]:
    """Split text on any separator, keeping the separators as their own pieces."""
    pieces, start, index = [], 0, 0
    ordered = sorted(separators, key=len, reverse=True)
    while index < len(text):
        match = next((s for s in ordered if text.startswith(s, index)), None)
        if match is None:
            index += 1
            continue
        if index > start:
            pieces.append(text[start:index])
        pieces.append(match)
        index += len(match)
        start = index
    if start < len(text):
        pieces.append(text[start:])
    return pieces

