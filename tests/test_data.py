"""Data pipeline: inputs, cleaning counts, token cache (dtype, reuse, split), batch windows."""

from __future__ import annotations

import gzip
import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from model.chat import encode_chat
from model.tokenizer import Tokenizer
from trainer.data import CHUNK_CHARS, CleaningSettings, DataError, DocumentReader, _paragraph_chunks, resolve_inputs
from trainer.token_cache import TokenWindows, load_or_build_cache, split_ranges, token_dtype

FIXTURES = Path(__file__).parent / "fixtures"


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_all(paths: list[str], **settings) -> tuple[list, DocumentReader]:
    reader = DocumentReader(resolve_inputs(paths), CleaningSettings(**settings))
    documents = []
    for document in reader.documents():
        documents.append("".join(document.chunks) if document.chunks is not None else document.messages)
    return documents, reader


def test_each_cleaning_step_is_counted(tmp_path):
    decomposed = unicodedata.normalize("NFD", "café crème brûlée, a dessert")
    chat = {"messages": [{"role": "user", "content": "hi there, how are you"},
                         {"role": "assistant", "content": "fine,\x00 thanks"}]}
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"text": decomposed},
        {"text": "bell\x07 and escape\x1b characters here\r\nnext line"},
        {"text": "a perfectly ordinary document"},
        {"text": "a perfectly ordinary document"},  # duplicate
        {"text": "short"},  # under min_chars
        "{not json",  # bad line 6
        {"title": "no text field"},  # bad line 7
        chat,
        chat,  # duplicate chat
    ])
    documents, reader = read_all([str(data)], min_chars=16)
    stats = reader.stats
    assert stats.documents_read == 7
    assert stats.nfc_changed == 1
    # \x07, \x1b, and the \x00 of each chat: cleaning runs before duplicates are spotted.
    assert stats.control_chars_removed == 4
    assert stats.duplicates_removed == 2
    assert stats.too_short_removed == 1
    assert stats.bad_lines == 2 and stats.first_bad_lines == [f"{data}:6", f"{data}:7"]
    assert stats.documents_kept == 4
    assert documents[0] == unicodedata.normalize("NFC", decomposed)
    assert documents[1] == "bell and escape characters here\nnext line"
    assert documents[3][1]["content"] == "fine, thanks"


def test_strict_stops_at_the_bad_line_with_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine document number one"}, "", "[1, 2"])
    with pytest.raises(DataError, match=rf"{data}:3: not valid JSON"):
        read_all([str(data)], strict=True)


def test_gzip_folder_glob_and_missing_inputs(tmp_path):
    text = (FIXTURES / "shakespeare_sample.txt").read_text()
    (tmp_path / "sub").mkdir()
    with gzip.open(tmp_path / "sub" / "plays.txt.gz", "wt") as handle:
        handle.write(text)
    with gzip.open(tmp_path / "chats.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"text": "a gzipped JSON lines document"}) + "\n")
    (tmp_path / "notes.md").write_text("# Notes\n\nMarkdown is read as text too.\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")  # ignored in folders
    folder_docs, _ = read_all([str(tmp_path)])
    assert sorted(map(str, folder_docs)) == sorted([text, "a gzipped JSON lines document",
                                                    "# Notes\n\nMarkdown is read as text too.\n"])
    glob_docs, _ = read_all([str(tmp_path / "**" / "*.gz")])
    assert len(glob_docs) == 2 and text in glob_docs
    with pytest.raises(DataError, match="no such file or folder"):
        resolve_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match="matches no"):
        resolve_inputs([str(tmp_path / "*.csv")])
    with pytest.raises(DataError, match="unsupported file type"):
        resolve_inputs([str(tmp_path / "image.png")])


def test_duplicate_text_files_are_dropped_whole(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("The same file twice.\n\nSecond paragraph.\n")
    documents, reader = read_all([str(tmp_path)])
    assert len(documents) == 1 and reader.stats.duplicates_removed == 1


def test_text_is_streamed_in_bounded_paragraph_chunks(tmp_path):
    paragraph = "word " * 200 + "\n\n"
    path = tmp_path / "big.txt"
    path.write_text(paragraph * 2000)  # ~2 MB
    chunks = list(_paragraph_chunks(path))
    assert "".join(chunks) == paragraph * 2000
    assert len(chunks) > 10
    assert all(len(c) < CHUNK_CHARS + len(paragraph) for c in chunks)
    assert all(c.endswith("\n\n") for c in chunks)


def test_token_cache_contents_dtype_and_reuse(tmp_path, tokenizer):
    text_file = tmp_path / "t.txt"
    text_file.write_text("Once upon a time there was a small model.\n")
    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "What is a cat?"},
                                                             {"role": "assistant", "content": "A small animal."}]}])
    sources = resolve_inputs([str(text_file), str(chats)])
    messages = []
    cache = load_or_build_cache(sources, tokenizer, CleaningSettings(), 0.0, tmp_path / "cache", log=messages.append)
    assert cache.meta["dtype"] == "uint16" and token_dtype(70000) == np.uint32
    expected = ([tokenizer.bos_id] + tokenizer.encode("Once upon a time there was a small model.\n")
                + [tokenizer.eos_id])
    chat_ids = encode_chat(tokenizer, json.loads(chats.read_text())["messages"], add_generation_prompt=False).ids
    expected += chat_ids + [tokenizer.eos_id]
    assert cache.tokens().tolist() == expected
    assert any("kept: 2 documents" in m for m in messages)

    built_at = (cache.folder / "tokens.bin").stat().st_mtime_ns
    messages.clear()
    again = load_or_build_cache(sources, tokenizer, CleaningSettings(), 0.0, tmp_path / "cache", log=messages.append)
    assert again.folder == cache.folder and "reusing" in messages[0]
    assert (again.folder / "tokens.bin").stat().st_mtime_ns == built_at

    os.utime(text_file, ns=(built_at + 10**9, built_at + 10**9))  # touched input: new key, rebuilt
    rebuilt = load_or_build_cache(resolve_inputs([str(text_file), str(chats)]), tokenizer, CleaningSettings(),
                                  0.0, tmp_path / "cache", log=messages.append)
    assert rebuilt.folder != cache.folder


def test_large_vocab_uses_uint32(tmp_path, tokenizer):
    class WideTokenizer(Tokenizer):
        vocab_size = 70_000  # pretend: ids still fit, but the cache must choose uint32

    wide = WideTokenizer(tokenizer.backend, tokenizer.info)
    path = tmp_path / "t.txt"
    path.write_text("Some text to tokenize with a wide vocabulary.\n")
    narrow_cache = load_or_build_cache(resolve_inputs([str(path)]), tokenizer, CleaningSettings(), 0.0,
                                       tmp_path / "cache")
    wide_cache = load_or_build_cache(resolve_inputs([str(path)]), wide, CleaningSettings(), 0.0, tmp_path / "cache")
    assert wide_cache.meta["dtype"] == "uint32" and wide_cache.tokens().dtype == np.uint32
    assert (tmp_path / "cache").exists() and wide_cache.folder != narrow_cache.folder
    assert wide_cache.tokens().tolist() == narrow_cache.tokens().tolist()


def test_empty_corpus_after_cleaning_is_an_error(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "tiny"}, {"text": "tiny"}])
    with pytest.raises(DataError, match="empty after cleaning.*1 duplicates, 1 shorter"):
        load_or_build_cache(resolve_inputs([str(data)]), tokenizer, CleaningSettings(), 0.0, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # no half-written cache left behind


def test_split_ranges_cover_the_corpus_without_overlap():
    for num_tokens, fraction in ((1000, 0.1), (1_000_000, 0.01), (50, 0.2)):
        train, val = split_ranges(num_tokens, fraction)
        spans = sorted(train + val)
        assert spans[0][0] == 0 and spans[-1][1] == num_tokens
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        val_tokens = sum(e - s for s, e in val)
        assert abs(val_tokens - num_tokens * fraction) <= len(val) + 1
    assert len(split_ranges(1_000_000, 0.01)[1]) > 1  # spread through the corpus


def _windows_cache(tmp_path, tokenizer, val_fraction=0.1):
    sources = resolve_inputs([str(FIXTURES / "shakespeare_sample.txt"), str(FIXTURES / "dictionary_sample.txt")])
    return load_or_build_cache(sources, tokenizer, CleaningSettings(), val_fraction, tmp_path / "cache")


def test_windows_form_one_stream_and_resume_exactly(tmp_path, tokenizer):
    cache = _windows_cache(tmp_path, tokenizer)
    whole = TokenWindows(cache, "train", 32, seed=3)
    inputs, targets = whole.next_batch(10)
    assert inputs.shape == (10, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are inputs shifted by one
    pieces = TokenWindows(cache, "train", 32, seed=3)
    first, _ = pieces.next_batch(4)
    state = json.loads(json.dumps(pieces.state_dict()))
    second, _ = pieces.next_batch(6)
    assert torch.equal(torch.cat([first, second]), inputs)
    restored = TokenWindows(cache, "train", 32, seed=3)
    restored.load_state_dict(state)
    assert torch.equal(restored.next_batch(6)[0], second)


def test_windows_stay_inside_their_split_and_cycle_epochs(tmp_path, tokenizer):
    cache = _windows_cache(tmp_path, tokenizer)
    tokens = torch.from_numpy(cache.tokens().astype(np.int64))
    val_positions = torch.zeros(len(tokens), dtype=torch.bool)
    for start, end in cache.ranges("val"):
        val_positions[start:end] = True
    windows = TokenWindows(cache, "train", 64, seed=0)
    starts = windows._window_starts(np.arange(windows.num_windows))
    for start in starts:
        assert not val_positions[start:start + 65].any()
    inputs, _ = windows.next_batch(windows.num_windows + 5)  # wraps into the second epoch
    assert windows.epoch == 1 and windows.cursor == 5
    assert len({tuple(row.tolist()) for row in inputs[:windows.num_windows]}) == windows.num_windows
    val = TokenWindows(cache, "val", 64)
    val_inputs, _ = val.next_batch(2)
    assert val_inputs.shape == (2, 64)


def test_hugging_face_dataset_saved_to_disk(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["first document from a dataset", "second document from a dataset", "x"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    documents, reader = read_all([str(tmp_path / "ds")])
    assert documents == rows["text"][:2] and reader.stats.too_short_removed == 1
    chats = {"messages": [[{"role": "user", "content": "Hello, who are you?"},
                           {"role": "assistant", "content": "A small model."}]]}
    datasets.DatasetDict({"train": datasets.Dataset.from_list([chats | {"messages": chats["messages"][0]}])}
                         ).save_to_disk(str(tmp_path / "chats"))
    cache = load_or_build_cache(resolve_inputs([str(tmp_path / "chats")]), tokenizer, CleaningSettings(), 0.0,
                                tmp_path / "cache")
    expected = encode_chat(tokenizer, chats["messages"][0], add_generation_prompt=False).ids + [tokenizer.eos_id]
    assert cache.tokens().tolist() == expected
