"""GGUF tokenizer metadata <-> a Hugging Face `tokenizers` tokenizer plus Hearth's TokenizerInfo.

Import builds the tokenizer.json the model's own Hugging Face tokenizer would
have, from `tokenizer.ggml.*` keys alone:

- `gpt2` (byte-level BPE): vocab from `tokens`, merges from `merges`, the
  pre-tokenizer chosen by `tokenizer.ggml.pre` (PRE_TOKENIZERS: the exact
  pre-tokenizer of that family's tokenizer.json, e.g. SmolLM2's digits-then-
  ByteLevel, Llama 3's split regex with `ignore_merges`, Qwen2's NFC + regex).
- `llama` (SentencePiece BPE with byte fallback): merges rebuilt from the
  scores the way transformers' SentencePieceExtractor does (each piece that
  splits into two vocabulary pieces is a merge, ranked by its score), `▁` for
  spaces, a prefix space when `add_space_prefix` (default true) says so.
- Token types: CONTROL tokens are special added tokens (never produced from
  user text), USER_DEFINED ones plain added tokens.
- TokenizerInfo: bos / eos / pad from their ids, every EOS and EOT id a stop
  token, `add_bos` from `tokenizer.ggml.add_bos_token` (absent: llama.cpp's
  default, true for `llama` and the Llama 3 pre-tokenizer, false otherwise),
  `tokenizer.chat_template` as the model's Jinja template.

Export writes the same keys for a byte-level BPE checkpoint; the pre-tokenizer
name is the table entry whose tokenizer.json form equals the checkpoint's
(Hearth's own: ByteLevel with the GPT-2 regex = `gpt-2`).

Every problem is a GGUFError naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.errors import HearthError
from model.tokenizer import Tokenizer, TokenizerInfo

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"


class GGUFError(HearthError):
    """A GGUF file Hearth cannot import, or a checkpoint it cannot export."""


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTE_LEVEL_NO_REGEX = {**_BYTE_LEVEL, "use_regex": False}
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex: str) -> dict[str, Any]:
    split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, _BYTE_LEVEL_NO_REGEX]}


_DIGITS_THEN_BYTES = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}

# tokenizer.ggml.pre -> (normalizer, pre_tokenizer, ignore_merges), as that family's tokenizer.json has them.
PRE_TOKENIZERS: dict[str, tuple[dict | None, dict, bool]] = {
    "gpt-2": (None, _BYTE_LEVEL, False),
    "default": (None, _BYTE_LEVEL, False),
    "smollm": (None, _DIGITS_THEN_BYTES, False),
    "starcoder": (None, _DIGITS_THEN_BYTES, False),
    "llama-bpe": (None, _split_then_bytes(LLAMA3_REGEX), True),
    "llama3": (None, _split_then_bytes(LLAMA3_REGEX), True),
    "qwen2": ({"type": "NFC"}, _split_then_bytes(QWEN2_REGEX), False),
}
EXPORT_PRE_NAMES = ("gpt-2", "smollm", "llama-bpe", "qwen2")  # the name export writes for each form


# ----------------------------------------------------------------------------- reading keys


def field_value(fields: dict[str, Any], key: str, file: Path, required: bool = True) -> Any:
    """The contents of one metadata key (a scalar, a string or a list)."""
    field = fields.get(key)
    if field is None:
        if required:
            raise GGUFError(f"{file}: missing key {key}")
        return None
    try:
        return field.contents()
    except Exception as exc:  # gguf raises plain ValueError/IndexError on malformed fields
        raise GGUFError(f"{file}: key {key} is malformed ({exc})") from None


def _token_id(fields: dict[str, Any], key: str, file: Path, vocab_size: int) -> int | None:
    value = field_value(fields, key, file, required=False)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise GGUFError(f"{file}: key {key} = {value!r} is not a token id (vocabulary of {vocab_size})")
    return value


# ----------------------------------------------------------------------------- import


def tokenizer_from_gguf(fields: dict[str, Any], file: Path) -> Tokenizer:
    """Hearth Tokenizer (tokenizers backend + TokenizerInfo) from a GGUF file's metadata."""
    from tokenizers import Tokenizer as HFTokenizer

    kind = field_value(fields, "tokenizer.ggml.model", file)
    tokens = field_value(fields, "tokenizer.ggml.tokens", file)
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{file}: key tokenizer.ggml.tokens is not a list of strings")
    types = field_value(fields, "tokenizer.ggml.token_type", file, required=False) or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{file}: key tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        spec, add_bos_default = _gpt2_spec(fields, file, tokens), _pre_name(fields, file) in ("llama-bpe", "llama3")
    elif kind == "llama":
        spec, add_bos_default = _llama_spec(fields, file, tokens), True
    else:
        raise GGUFError(f"{file}: key tokenizer.ggml.model = {kind!r} is not supported, expected gpt2 or llama")
    spec["added_tokens"] = _added_tokens(tokens, types)
    add_bos = field_value(fields, "tokenizer.ggml.add_bos_token", file, required=False)
    add_bos = add_bos_default if add_bos is None else bool(add_bos)
    info = _tokenizer_info(fields, file, tokens, add_bos)
    if add_bos and info.bos_token is not None:  # tokenizer(text) adds BOS, as the model's own would
        spec["post_processor"] = _bos_processor(info.bos_token, _token_id(fields, "tokenizer.ggml.bos_token_id", file,
                                                                          len(tokens)))
    try:
        backend = HFTokenizer.from_str(json.dumps(spec))
    except Exception as exc:  # tokenizers raises bare Exceptions
        raise GGUFError(f"{file}: tokenizer.ggml.* does not make a valid tokenizer ({str(exc).splitlines()[0]})") from None
    return Tokenizer(backend, info)


def _pre_name(fields: dict[str, Any], file: Path) -> str:
    return field_value(fields, "tokenizer.ggml.pre", file, required=False) or "default"


def _base_spec() -> dict[str, Any]:
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": None}


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a duplicate keeps its first id (the later one is unreachable)
    return vocab


def _gpt2_spec(fields: dict[str, Any], file: Path, tokens: list[str]) -> dict[str, Any]:
    pre = _pre_name(fields, file)
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{file}: key tokenizer.ggml.pre = {pre!r} is not supported, expected one of "
                        f"{', '.join(PRE_TOKENIZERS)}")
    merges = field_value(fields, "tokenizer.ggml.merges", file)
    if not isinstance(merges, list) or not all(isinstance(m, str) and m.count(" ") == 1 for m in merges):
        raise GGUFError(f"{file}: key tokenizer.ggml.merges is not a list of 'left right' strings")
    normalizer, pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
             "vocab": _vocab(tokens), "merges": [m.split(" ") for m in merges]}
    decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return {**_base_spec(), "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "decoder": decoder, "model": model}


def _llama_spec(fields: dict[str, Any], file: Path, tokens: list[str]) -> dict[str, Any]:
    scores = field_value(fields, "tokenizer.ggml.scores", file)
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise GGUFError(f"{file}: key tokenizer.ggml.scores must hold one score per token ({len(tokens)})")
    unk_id = _token_id(fields, "tokenizer.ggml.unknown_token_id", file, len(tokens))
    space_prefix = field_value(fields, "tokenizer.ggml.add_space_prefix", file, required=False)
    space_prefix = True if space_prefix is None else bool(space_prefix)
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_SPACE}
    prepend = [{"type": "Prepend", "prepend": SPIECE_SPACE}] if space_prefix else []
    decoders = [{"type": "Replace", "pattern": {"String": SPIECE_SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    model = {"type": "BPE", "dropout": None, "unk_token": tokens[unk_id] if unk_id is not None else None,
             "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
             "byte_fallback": True, "ignore_merges": False, "vocab": _vocab(tokens),
             "merges": sentencepiece_merges(tokens, scores)}
    return {**_base_spec(), "normalizer": {"type": "Sequence", "normalizers": prepend + [replace]},
            "decoder": {"type": "Sequence", "decoders": decoders}, "model": model}


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """BPE merges from SentencePiece pieces and scores, as transformers' generate_merges makes them."""
    vocab = _vocab(tokens)
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # transformers' generate_merges order
    return [[left, right] for left, right, _ in merges]


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    return [{"id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": kind == CONTROL}
            for index, (token, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]


def _bos_processor(bos: str, bos_id: int) -> dict[str, Any]:
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _tokenizer_info(fields: dict[str, Any], file: Path, tokens: list[str], add_bos: bool) -> TokenizerInfo:
    def token(key: str) -> str | None:
        token_id = _token_id(fields, f"tokenizer.ggml.{key}", file, len(tokens))
        return None if token_id is None else tokens[token_id]

    eos = token("eos_token_id")
    stops = [t for t in (eos, token("eot_token_id"), token("eom_token_id")) if t is not None]
    template = field_value(fields, "tokenizer.chat_template", file, required=False)
    return TokenizerInfo(bos_token=token("bos_token_id"), eos_token=eos, pad_token=token("padding_token_id"),
                         chat_template="jinja", jinja_template=template if isinstance(template, str) else None,
                         stop_tokens=list(dict.fromkeys(stops)), add_bos=add_bos)


# ----------------------------------------------------------------------------- export


def gguf_tokenizer_fields(tokenizer: Tokenizer, vocab_size: int, chat_template: str | None) -> dict[str, Any]:
    """tokenizer.ggml.* keys (name -> value) for a byte-level BPE checkpoint tokenizer."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFError("tokenizer.json: export-gguf writes byte-level BPE tokenizers only "
                        f"(this one is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''})")
    pre = export_pre_name(spec)
    tokens, types = _export_tokens(tokenizer, spec, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    info = tokenizer.info
    fields: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                              "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                              "tokenizer.ggml.merges": merges, "tokenizer.ggml.add_bos_token": info.add_bos}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "padding_token_id": tokenizer.pad_id,
           "eot_token_id": next((i for i in tokenizer.stop_ids if i != tokenizer.eos_id), None)}
    fields.update({f"tokenizer.ggml.{key}": value for key, value in ids.items() if value is not None})
    if chat_template:
        fields["tokenizer.chat_template"] = chat_template
    return fields


def export_pre_name(spec: dict[str, Any]) -> str:
    """The tokenizer.ggml.pre whose tokenizer.json form is this tokenizer's normalizer + pre-tokenizer."""
    ignore = bool((spec.get("model") or {}).get("ignore_merges"))
    for name in EXPORT_PRE_NAMES:
        normalizer, pre_tokenizer, ignore_merges = PRE_TOKENIZERS[name]
        if (_same(spec.get("normalizer"), normalizer) and _same(spec.get("pre_tokenizer"), pre_tokenizer)
                and ignore == ignore_merges):
            return name
    raise GGUFError("tokenizer.json: its pre-tokenizer matches none llama.cpp knows "
                    f"({', '.join(EXPORT_PRE_NAMES)}); export-gguf cannot name it in tokenizer.ggml.pre")


def _same(found: Any, expected: Any) -> bool:
    """Equal, ignoring keys that do not change how text splits (ByteLevel's trim_offsets)."""
    if isinstance(found, dict) and isinstance(expected, dict):
        keys = (set(found) | set(expected)) - {"trim_offsets"}
        return all(_same(found.get(k), expected.get(k)) for k in keys)
    if isinstance(found, list) and isinstance(expected, list):
        return len(found) == len(expected) and all(_same(a, b) for a, b in zip(found, expected))
    return found == expected


def _export_tokens(tokenizer: Tokenizer, spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {index: token for token, index in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):  # rows past the tokenizer's vocabulary get unused placeholders
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
            continue
        tokens.append(token)
        types.append(NORMAL if index not in added else CONTROL if added[index].get("special") else USER_DEFINED)
    return tokens, types
