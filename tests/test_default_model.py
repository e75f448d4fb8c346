"""The bundled default model: served out of the box, it answers, and its card's figures hold.

`weights/default` is committed to the repository (scripts/train-default-model.sh
rebuilds it), so these tests need neither the network nor ../shared: the eval
slice is a fixture cut from the validation chats, and the card records the
figure `hearth eval` gave on exactly that slice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from model.checkpoint import load_checkpoint
from server_fixtures import http_client, running_server
from cli.main import main

DEFAULT = Path(__file__).resolve().parents[1] / "weights" / "default"
SLICE = Path(__file__).parent / "fixtures" / "wordnet_chat_valid_slice.jsonl"


@pytest.fixture(scope="module")
def server():
    with running_server(DEFAULT, dtype="auto") as running:  # as `make serve` runs it
        yield running


def card_figure(label: str) -> float:
    """The number in the model card's table row that starts with `label`."""
    card = (DEFAULT / "README.md").read_text()
    match = re.search(rf"^\| {re.escape(label)}[^|]*\| ([0-9.]+) \|", card, flags=re.MULTILINE)
    assert match, f"row {label!r} not found in {DEFAULT / 'README.md'}"
    return float(match.group(1))


def test_default_model_is_small_int8_and_has_a_card():
    checkpoint = load_checkpoint(DEFAULT)
    size = sum(path.stat().st_size for path in DEFAULT.iterdir() if path.is_file())
    assert size <= 30e6
    assert checkpoint.quantization["method"] == "int8"
    card = (DEFAULT / "README.md").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in card


# WordNet 3.0's first sense of "happy" (adjective), and its words that carry meaning.
FIRST_SENSE_OF_HAPPY = "enjoying or showing or marked by joy or pleasure"
FIRST_SENSE_WORDS = set(FIRST_SENSE_OF_HAPPY.split()) - {"or", "by"}


def test_served_as_default_and_answers_about_the_word_asked(server):
    """The served model answers in the dictionary form it was fine-tuned on, about the word asked:
    the word, its part of speech, and at least one word of WordNet's first sense.

    The last is a low bar, and this model clears it through the adjective template it learnt ("having or
    showing ..."), not by knowing what "happy" means: its card reports token F1 against WordNet's answers.
    """
    with http_client(server.url) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["default"]
        body = {"model": "default", "temperature": 0, "max_tokens": 64,
                "messages": [{"role": "user", "content": 'What does "happy" mean?'}]}
        choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    reply = choice["message"]["content"]
    assert "happy" in reply.lower(), reply
    assert "(adjective)" in reply, reply
    assert FIRST_SENSE_WORDS & set(re.findall(r"[a-z]+", reply.lower())), reply
    assert choice["finish_reason"] == "stop"  # it ends its answer by itself


def test_eval_matches_the_card(capsys):
    assert main(["eval", str(DEFAULT), "--data", str(SLICE)]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = card_figure("assistant-token loss, test slice")
    assert result["chats"] == 64
    assert abs(result["assistant_loss"] - expected) <= 0.05 * expected, (result["assistant_loss"], expected)
