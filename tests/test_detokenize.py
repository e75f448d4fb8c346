"""IncrementalDetokenizer: exact reassembly, no split characters, stop strings, flush, O(1) window."""

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from model.tokenizer import EOS, END, Tokenizer, TokenizerInfo
from server.engine.detokenize import IncrementalDetokenizer

PIECES = [
    "hello", " world", "def f(x):\n", "    return x ** 2\n", "\t", "  ", "\n\n", "{}", "[]()", "->", "==",
    "你好", "世界", "中文字符", "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "é", "ñ", "ü", "Ω", "∑", "—", "…", "\u00a0", " ", "1234",
]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25)))


def stream(detok: IncrementalDetokenizer, token_ids: list[int]) -> tuple[list[str], int | None]:
    """Feed tokens until a stop -> (emitted chunks, index of the token that hit a stop)."""
    chunks = []
    for index, token in enumerate(token_ids):
        text, hit_stop = detok.add(token)
        chunks.append(text)
        if hit_stop:
            return chunks, index
    chunks.append(detok.flush())
    return chunks, None


def test_random_unicode_texts_reassemble_exactly(tokenizer):
    rng = random.Random(0)
    for _ in range(150):
        text = random_text(rng)
        token_ids = tokenizer.encode(text)
        detok = IncrementalDetokenizer(tokenizer, stop=[])
        chunks, stopped_at = stream(detok, token_ids)
        assert stopped_at is None
        assert "".join(chunks) == text == detok.text
        assert not any("\ufffd" in chunk for chunk in chunks)  # never half a character


def test_multibyte_characters_span_tokens_and_are_held_back(tokenizer):
    token_ids = tokenizer.encode("😀")
    assert len(token_ids) > 1  # the fixture tokenizer has no emoji merges: one token per byte
    detok = IncrementalDetokenizer(tokenizer, stop=[])
    emitted = [detok.add(token)[0] for token in token_ids]
    assert emitted == [""] * (len(token_ids) - 1) + ["😀"]


def test_text_is_emitted_as_soon_as_it_is_complete(tokenizer):
    text = "To be, or not to be: that is the question."
    token_ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, stop=["XYZ"])
    for index, token in enumerate(token_ids):
        detok.add(token)
        assert detok.text == tokenizer.decode(token_ids[: index + 1])  # nothing held: no X in sight


def test_prompt_context_does_not_change_the_output(tokenizer):
    rng = random.Random(1)
    for _ in range(30):
        prompt, text = random_text(rng), random_text(rng)
        detok = IncrementalDetokenizer(tokenizer, stop=[], prompt_ids=tokenizer.encode(prompt))
        chunks, _ = stream(detok, tokenizer.encode(text))
        assert "".join(chunks) == text


def test_special_tokens_are_skipped(tokenizer):
    token_ids = tokenizer.encode("hello") + [tokenizer.token_id(END)] + tokenizer.encode(" you") + [tokenizer.token_id(EOS)]
    detok = IncrementalDetokenizer(tokenizer, stop=[])
    chunks, _ = stream(detok, token_ids)
    assert "".join(chunks) == "hello you"


class CountingTokenizer:
    """Wraps a Tokenizer and records the length of every decode call."""

    def __init__(self, inner: Tokenizer):
        self.inner, self.decoded_lengths = inner, []

    def decode(self, ids, skip_special=True):
        ids = list(ids)
        self.decoded_lengths.append(len(ids))
        return self.inner.decode(ids, skip_special)


def test_each_step_decodes_a_short_window_not_the_whole_output(tokenizer):
    text = ("The quick brown fox 跳过 the lazy dog 🐕. " * 80)
    token_ids = tokenizer.encode(text)
    assert len(token_ids) > 1500
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, stop=["never there"], prompt_ids=tokenizer.encode("Once upon a time"))
    chunks, _ = stream(detok, token_ids)
    assert "".join(chunks) == text
    assert len(counting.decoded_lengths) <= 2 * len(token_ids) + 3
    assert max(counting.decoded_lengths) <= 12  # a character spans at most 4 byte tokens


def expected_before_stop(text: str, stops: list[str]) -> str | None:
    found = [text.find(stop) for stop in stops if stop in text]
    return text[: min(found)] if found else None


def check_stop(tokenizer, text: str, stops: list[str]) -> list[str]:
    """Stream text with stops; check the result against a whole-text reference."""
    token_ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, stop=stops)
    chunks, stopped_at = stream(detok, token_ids)
    if expected_before_stop(text, stops) is None:
        assert stopped_at is None and "".join(chunks) == text
        return chunks
    # The stop hits on the first token whose text completes a stop string (generation ends
    # there: a longer stop string that would have started earlier never completes), and
    # the text ends where the earliest stop string completed by then starts.
    prefixes = [tokenizer.decode(token_ids[: i + 1]) for i in range(len(token_ids))]
    first_hit = next(i for i, prefix in enumerate(prefixes) if expected_before_stop(prefix, stops) is not None)
    expected = expected_before_stop(prefixes[first_hit], stops)
    assert stopped_at == first_hit
    assert "".join(chunks) == expected == detok.text
    assert detok.stop_reason in stops and text[len(expected):].startswith(detok.stop_reason)
    assert detok.add(token_ids[0]) == ("", True) and detok.flush() == ""  # finished for good
    return chunks


def test_stop_string_spanning_token_boundaries(tokenizer):
    text = "Thou art more lovely and more temperate. Rough winds do shake"
    stop = "lovely and more temp"
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(text)]
    assert not any(stop in piece for piece in pieces)  # it really spans several tokens
    check_stop(tokenizer, text, [stop])


def test_stop_string_at_the_very_start(tokenizer):
    chunks = check_stop(tokenizer, "Hello there, friend", ["Hel"])
    assert chunks[-1] == "" and "".join(chunks) == ""


def test_overlapping_partial_matches(tokenizer):
    # "aab" inside "aaab": the first "aa" is a false start that must be released, not lost.
    check_stop(tokenizer, "xaaab tail", ["aab"])
    check_stop(tokenizer, "abababc end", ["ababc"])
    check_stop(tokenizer, "no match here: abab", ["ababc"])  # held prefix flushed at the end


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    chunks = check_stop(tokenizer, "one two three four", ["four", "two", "three"])
    assert "".join(chunks) == "one "
    # Both complete with the same character: the one that starts first decides.
    chunks = check_stop(tokenizer, "xyz abc def", ["c", "abc"])
    assert "".join(chunks) == "xyz "
    # "bc" completes before "abcd" could: generation stops there.
    chunks = check_stop(tokenizer, "xyz abcd", ["abcd", "bc"])
    assert "".join(chunks) == "xyz a"


def test_stop_strings_with_multibyte_characters(tokenizer):
    check_stop(tokenizer, "价格是 100 元。谢谢 😀 bye", ["谢谢"])
    check_stop(tokenizer, "smile 😀 and wave", ["😀 and"])


def test_random_stop_strings_match_the_whole_text_reference(tokenizer):
    rng = random.Random(2)
    for _ in range(150):
        text = random_text(rng)
        start = rng.randrange(len(text))
        stops = [text[start:start + rng.randint(1, 8)], rng.choice(PIECES) + rng.choice(PIECES)]
        check_stop(tokenizer, text, stops)


def test_flush_returns_the_held_back_tail(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=["\n\nUser:"])
    emitted = "".join(detok.add(token)[0] for token in tokenizer.encode("Answer.\n\nUs"))
    assert emitted == "Answer."  # "\n\nUs" could still become the stop string
    assert detok.flush() == "\n\nUs"
    assert detok.text == "Answer.\n\nUs"
    assert detok.flush() == ""


def test_flush_emits_an_unfinished_character_as_replacement(tokenizer):
    token_ids = tokenizer.encode("ok 😀")
    detok = IncrementalDetokenizer(tokenizer, stop=[])
    emitted = "".join(detok.add(token)[0] for token in token_ids[:-1])  # the emoji's last byte never comes
    assert emitted == "ok "
    assert detok.flush() == "\ufffd"


def test_invalid_bytes_are_not_held_forever(tokenizer):
    continuation_byte = tokenizer.encode("😀")[-1]  # a lone continuation byte is never valid
    token_ids = [continuation_byte] * 100 + tokenizer.encode("a 😀")
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, stop=[])
    chunks, _ = stream(detok, token_ids)
    assert "".join(chunks) == "\ufffd" * 100 + "a 😀" == tokenizer.decode(token_ids)
    assert max(counting.decoded_lengths) <= 12  # the window did not grow with the garbage


def sentencepiece_style_tokenizer() -> Tokenizer:
    """A Llama-style decoder: '▁' marks a space, and the first token's leading space is dropped."""
    vocab = {"▁Hello": 0, "▁world": 1, "!": 2, "▁and": 3, "▁you": 4, "<unk>": 5}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return Tokenizer(backend, TokenizerInfo(bos_token=None, eos_token=None, pad_token=None, stop_tokens=[]))


def test_window_keeps_spaces_of_sentencepiece_style_decoders():
    tokenizer = sentencepiece_style_tokenizer()
    assert tokenizer.decode([1]) == "world"  # decoded alone, the space is gone
    detok = IncrementalDetokenizer(tokenizer, stop=[])
    assert "".join(detok.add(t)[0] for t in [0, 1, 2, 3, 4]) + detok.flush() == "Hello world! and you"
    detok = IncrementalDetokenizer(tokenizer, stop=[], prompt_ids=[0])
    assert "".join(detok.add(t)[0] for t in [1, 2]) + detok.flush() == " world!"


@pytest.mark.parametrize("stops", [[], ["d!"]])
def test_stop_matching_with_sentencepiece_style_decoders(stops):
    tokenizer = sentencepiece_style_tokenizer()
    detok = IncrementalDetokenizer(tokenizer, stop=stops)
    chunks, stopped_at = stream(detok, [0, 1, 2, 3])
    assert "".join(chunks) == ("Hello worl" if stops else "Hello world! and")
    assert stopped_at == (2 if stops else None)
