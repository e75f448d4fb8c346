"""Training data: finding the inputs, reading documents, cleaning them.

Inputs (`--data`, any number): `.txt`, `.md`, `.jsonl` files and their gzip
versions, folders (searched recursively), glob patterns, and, when the
`datasets` package is installed, Hugging Face datasets: a folder written by
`save_to_disk`, or `hf:NAME[:SPLIT]` from the local Hugging Face cache.

Design choices:
- Everything streams. A text file is one document read in chunks of whole
  paragraphs; a JSONL line (`text`, or `messages` in OpenAI chat form) is one
  document. Nothing holds more than a chunk of text, plus the set of 64-bit
  document hashes used for de-duplication (8 bytes of payload per document).
- A text file's verdict (duplicate? too short?) needs the whole cleaned
  document, so text files are read twice: a cheap first pass hashes and
  measures, the second yields the chunks. Reading is far cheaper than
  tokenizing, and no token ever has to be taken back.
- Cleaning, in order, each step counted: Unicode NFC, removal of control
  characters (C0/C1 except tab and newline; CR and CRLF become LF), exact
  duplicates by hash of the cleaned document, documents shorter than
  `min_chars`. Bad JSONL lines are reported as file:line and skipped with a
  count, or stop the run under `strict`.
- gzip is recognised by its magic bytes, not the file name; the format (text
  or JSONL) by the name with `.gz` removed.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from model.errors import HearthError

TEXT_SUFFIXES, JSONL_SUFFIXES = (".txt", ".md"), (".jsonl",)
CHUNK_CHARS = 64 * 1024  # text is tokenized in pieces of about this many characters, cut at blank lines
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(HearthError):
    """Training data that is missing, unreadable or empty."""


@dataclass
class CleaningSettings:
    min_chars: int = 16  # documents shorter than this (after cleaning) are dropped
    dedupe: bool = True  # drop exact duplicate documents
    strict: bool = False  # a bad JSONL line stops the run instead of being skipped

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CleaningStats:
    documents_read: int = 0  # documents found in the inputs (bad lines excluded)
    bad_lines: int = 0  # JSONL lines skipped: not JSON, or neither `text` nor `messages`
    nfc_changed: int = 0  # documents whose text NFC normalisation changed
    control_chars_removed: int = 0  # characters removed (CRs turned into LF not counted)
    duplicates_removed: int = 0  # documents dropped as exact duplicates
    too_short_removed: int = 0  # documents dropped by the minimum-length filter
    documents_kept: int = 0
    chars_kept: int = 0
    first_bad_lines: list[str] = field(default_factory=list)  # file:line of the first few bad lines

    def report_lines(self) -> list[str]:
        lines = [f"documents read: {self.documents_read:,}"]
        if self.bad_lines:
            lines.append(f"bad JSONL lines skipped: {self.bad_lines:,} (first: {', '.join(self.first_bad_lines)})")
        lines += [
            f"Unicode NFC: changed {self.nfc_changed:,} documents",
            f"control characters: removed {self.control_chars_removed:,} characters",
            f"exact duplicates: removed {self.duplicates_removed:,} documents",
            f"shorter than the minimum length: removed {self.too_short_removed:,} documents",
            f"kept: {self.documents_kept:,} documents, {self.chars_kept:,} characters",
        ]
        return lines

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Document:
    origin: str  # "file" or "file:line", for messages
    chunks: Iterator[str] | None = None  # cleaned text, in pieces (text documents)
    messages: list[dict[str, Any]] | None = None  # cleaned chat messages (chat documents)


# -- inputs --------------------------------------------------------------------------


@dataclass
class InputSource:
    kind: str  # "text", "jsonl" or "hf"
    location: str  # file path, dataset folder, or hf:NAME[:SPLIT]

    def fingerprint(self) -> list[Any]:
        """What the token cache key depends on: path, size and mtime of every file involved."""
        if self.kind == "hf" and self.location.startswith("hf:"):
            return [self.location, _hf_fingerprint(self.location)]
        path = Path(self.location)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def resolve_inputs(specs: list[str]) -> list[InputSource]:
    """Expand --data arguments into input sources; a clear error for anything missing."""
    if not specs:
        raise DataError("--data: give at least one file, folder, glob or dataset")
    sources: list[InputSource] = []
    for spec in specs:
        sources.extend(_resolve_one(spec))
    return sources


def _resolve_one(spec: str) -> list[InputSource]:
    if spec.startswith("hf:"):
        _require_datasets(spec)
        return [InputSource("hf", spec)]
    path = Path(spec)
    if path.is_dir():
        if _is_saved_dataset(path):
            _require_datasets(spec)
            return [InputSource("hf", spec)]
        files = sorted(p for p in path.rglob("*") if p.is_file() and _data_kind(p))
        if not files:
            raise DataError(f"--data {spec}: folder holds no .txt, .md or .jsonl files (or their .gz)")
        return [InputSource(_data_kind(p), str(p)) for p in files]
    if path.is_file():
        kind = _data_kind(path)
        if kind is None:
            raise DataError(f"--data {spec}: unsupported file type (expected .txt, .md, .jsonl or their .gz)")
        return [InputSource(kind, spec)]
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        matched = [p for p in files if _data_kind(p)]
        if not matched:
            raise DataError(f"--data {spec}: the pattern matches no .txt, .md or .jsonl files")
        return [InputSource(_data_kind(p), str(p)) for p in matched]
    raise DataError(f"--data {spec}: no such file or folder")


def _data_kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _require_datasets(spec: str) -> None:
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"--data {spec}: Hugging Face datasets need the `datasets` package (pip install datasets)")


# -- reading and cleaning ---------------------------------------------------------


def open_text(path: Path) -> io.TextIOBase:
    """Open a text file for reading, gunzipping when its first bytes say gzip."""
    with open(path, "rb") as probe:
        is_gzip = probe.read(2) == _GZIP_MAGIC
    raw = gzip.open(path, "rb") if is_gzip else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def clean_text(text: str, stats: CleaningStats) -> str:
    """NFC, then control characters out (CRLF and CR become LF first)."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        stats.nfc_changed += 1
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, removed = _CONTROL_CHARS.subn("", text)
    stats.control_chars_removed += removed
    return text


class DocumentReader:
    """Streams cleaned, de-duplicated, length-filtered documents from input sources."""

    def __init__(self, sources: list[InputSource], settings: CleaningSettings):
        self.sources, self.settings = sources, settings
        self.stats = CleaningStats()
        self._seen_hashes: set[int] = set()

    def documents(self) -> Iterator[Document]:
        for source in self.sources:
            if source.kind == "text":
                yield from self._text_documents(Path(source.location))
            elif source.kind == "jsonl":
                yield from self._jsonl_documents(Path(source.location))
            else:
                yield from self._dataset_documents(source.location)

    def texts(self) -> Iterator[str]:
        """Plain text of every kept document (tokenizer training): text chunks and message contents."""
        for document in self.documents():
            if document.chunks is not None:
                yield from document.chunks
            else:
                yield from (m["content"] for m in document.messages)

    def _accept(self, digest: bytes, num_chars: int) -> bool:
        """Count the document, apply dedupe and the length filter."""
        self.stats.documents_read += 1
        key = int.from_bytes(digest[:8], "little")
        if self.settings.dedupe and key in self._seen_hashes:
            self.stats.duplicates_removed += 1
            return False
        self._seen_hashes.add(key)
        if num_chars < self.settings.min_chars:
            self.stats.too_short_removed += 1
            return False
        self.stats.documents_kept += 1
        self.stats.chars_kept += num_chars
        return True

    def _text_documents(self, path: Path) -> Iterator[Document]:
        # Pass 1: hash and measure the cleaned text, counting nothing twice.
        scratch = CleaningStats()
        hasher, num_chars = hashlib.blake2b(digest_size=8), 0
        for chunk in _paragraph_chunks(path):
            cleaned = clean_text(chunk, scratch)
            hasher.update(cleaned.encode("utf-8"))
            num_chars += len(cleaned)
        self.stats.nfc_changed += int(scratch.nfc_changed > 0)
        self.stats.control_chars_removed += scratch.control_chars_removed
        if self._accept(hasher.digest(), num_chars):
            discard = CleaningStats()  # pass 2 cleans again, already counted
            yield Document(str(path), chunks=(clean_text(c, discard) for c in _paragraph_chunks(path)))

    def _jsonl_documents(self, path: Path) -> Iterator[Document]:
        with open_text(path) as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = self._parse_line(line, f"{path}:{line_number}")
                if record is not None:
                    document = self._record_document(record, f"{path}:{line_number}")
                    if document is not None:
                        yield document

    def _parse_line(self, line: str, origin: str) -> dict | None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return self._bad_line(origin, f"not valid JSON ({exc.msg})")
        if not isinstance(record, dict) or not (isinstance(record.get("text"), str)
                                                or isinstance(record.get("messages"), list)):
            return self._bad_line(origin, "expected an object with a \"text\" string or a \"messages\" list")
        return record

    def _bad_line(self, origin: str, problem: str) -> None:
        if self.settings.strict:
            raise DataError(f"{origin}: {problem} (drop --strict to skip bad lines)")
        self.stats.bad_lines += 1
        if len(self.stats.first_bad_lines) < 3:
            self.stats.first_bad_lines.append(origin)
        return None

    def _record_document(self, record: dict, origin: str) -> Document | None:
        """A `text` or `messages` record, cleaned; None when dropped."""
        if isinstance(record.get("text"), str):
            text = clean_text(record["text"], self.stats)
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
            return Document(origin, chunks=iter([text])) if self._accept(digest, len(text)) else None
        messages = self._clean_messages(record["messages"], origin)
        if messages is None:
            return None
        canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")
        digest = hashlib.blake2b(canonical, digest_size=8).digest()
        num_chars = sum(len(m["content"]) for m in messages)
        return Document(origin, messages=messages) if self._accept(digest, num_chars) else None

    def _clean_messages(self, messages: list, origin: str) -> list[dict[str, str]] | None:
        from model.chat import ChatFormatError, message_text

        scratch = CleaningStats()
        cleaned = []
        try:
            for index, message in enumerate(messages):
                role, content = message_text(message, index)
                cleaned.append({"role": role, "content": clean_text(content, scratch)})
        except ChatFormatError as exc:
            return self._bad_line(origin, str(exc))
        if not cleaned:
            return self._bad_line(origin, "messages: empty list")
        self.stats.nfc_changed += int(scratch.nfc_changed > 0)
        self.stats.control_chars_removed += scratch.control_chars_removed
        return cleaned

    def _dataset_documents(self, location: str) -> Iterator[Document]:
        dataset = load_hf_dataset(location)
        for index, row in enumerate(_iterate_rows(dataset)):
            origin = f"{location}[{index}]"
            if not (isinstance(row.get("text"), str) or isinstance(row.get("messages"), list)):
                raise DataError(f"{location}: rows need a \"text\" string or a \"messages\" list "
                                f"(columns: {', '.join(dataset.column_names)})")
            document = self._record_document(row, origin)
            if document is not None:
                yield document


def _paragraph_chunks(path: Path) -> Iterator[str]:
    """The file's text in pieces of about CHUNK_CHARS, each ending after a blank line where possible."""
    pending: list[str] = []
    pending_chars = 0
    with open_text(path) as handle:
        for line in handle:
            pending.append(line)
            pending_chars += len(line)
            at_paragraph_end = line.strip() == ""
            if pending_chars >= CHUNK_CHARS and (at_paragraph_end or pending_chars >= 4 * CHUNK_CHARS):
                yield "".join(pending)
                pending, pending_chars = [], 0
    if pending:
        yield "".join(pending)


# -- Hugging Face datasets ---------------------------------------------------------------


def load_hf_dataset(location: str):
    """A `datasets.Dataset` from a save_to_disk folder or hf:NAME[:SPLIT] (local cache only)."""
    import datasets

    try:
        if location.startswith("hf:"):
            name, _, split = location[3:].partition(":")
            return datasets.load_dataset(name, split=split or "train")
        loaded = datasets.load_from_disk(location)
    except Exception as exc:  # datasets raises many types; the message is what matters
        raise DataError(f"--data {location}: could not load the dataset ({str(exc).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"--data {location}: dataset has no \"train\" split (splits: {', '.join(loaded)})")
        return loaded["train"]
    return loaded


def _iterate_rows(dataset, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
    """Rows in order, read a batch of columns at a time (much faster than row by row)."""
    for batch in dataset.iter(batch_size=batch_size):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


def _hf_fingerprint(location: str) -> str:
    dataset = load_hf_dataset(location)
    return getattr(dataset, "_fingerprint", "") or ""
