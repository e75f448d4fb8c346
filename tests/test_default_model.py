"""The default model: built from the shipped adapter, served out of the box, and its card's figures hold.

`weights/default` is SmolLM2-135M-Instruct with the fine-tune in
`weights/default-lora` merged and quantized (scripts/default_model/build.py;
`make test` builds it first, from the GGUF file scripts/fetch-smollm2.sh
fetches). Where the folder is not built yet, the module builds it (seconds)
if the GGUF file is present, and is skipped, saying so, if it is not. The eval
slice is a fixture cut from the validation chats, and the card records the
figure `hearth eval` gave on exactly that slice.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main
from model.checkpoint import load_checkpoint
from server_fixtures import http_client, running_server

ROOT = Path(__file__).resolve().parents[1]
DEFAULT, LORA = ROOT / "weights" / "default", ROOT / "weights" / "default-lora"
GGUF_FILE = ROOT / "weights" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SLICE = Path(__file__).parent / "fixtures" / "wordnet_chat_valid_slice.jsonl"
BUILD = [sys.executable, str(ROOT / "scripts" / "default_model" / "build.py")]


@pytest.fixture(scope="module")
def built() -> Path:
    if not (DEFAULT / "model.safetensors").is_file():
        if not GGUF_FILE.is_file():
            pytest.skip(f"{GGUF_FILE} is absent: run `make default` (it fetches SmolLM2 and builds weights/default)")
        subprocess.run([*BUILD, "--gguf", str(GGUF_FILE), "--out", str(DEFAULT)], check=True, cwd=ROOT)
    return DEFAULT


@pytest.fixture(scope="module")
def server(built):
    with running_server(built, dtype="auto", kv_cache_blocks=520) as running:  # one full 8192-token context
        yield running


def card_figure(checkpoint: Path, label: str) -> float:
    """The first number in the model card's table row that starts with `label`."""
    card = (checkpoint / "README.md").read_text()
    match = re.search(rf"^\| {re.escape(label)}[^|]*\| ([0-9.]+)", card, flags=re.MULTILINE)
    assert match, f"row {label!r} not found in {checkpoint / 'README.md'}"
    return float(match.group(1))


def ask(server, question: str, max_tokens: int = 96) -> dict:
    body = {"model": "default", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": question}]}
    with http_client(server.url) as client:
        return client.post("/v1/chat/completions", json=body).json()["choices"][0]


def test_repository_ships_a_small_adapter_and_the_card():
    assert sum(path.stat().st_size for path in LORA.iterdir()) <= 12e6
    card = (DEFAULT / "README.md").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in card
    assert "SmolLM2-135M-Instruct" in card and "Apache-2.0" in card


def test_built_default_is_int8_smollm2(built):
    checkpoint = load_checkpoint(built)
    assert checkpoint.quantization["method"] == "int8"
    assert checkpoint.config.n_layers == 30 and checkpoint.config.vocab_size == 49152


def test_served_as_default_and_answers_a_definition_in_dictionary_form(server):
    """The word and its part of speech, in the corpus' answer form, ended by the model itself.

    (Issue 18 also asks for a word of WordNet's first sense, "enjoying or showing or marked by joy or
    pleasure"; this model says "having a pleasant feeling": "happy" is in no training chat, only in the
    dictionary text it has not been trained on. The card's F1 figures measure that gap.)
    """
    with http_client(server.url) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["default"]
    choice = ask(server, 'What does "happy" mean?')
    reply = choice["message"]["content"]
    assert "happy" in reply.lower(), reply
    assert "(adjective)" in reply, reply
    assert choice["finish_reason"] == "stop"


def test_general_questions_stay_right_and_greetings_are_answered(server):
    assert "Paris" in ask(server, "What is the capital of France?")["message"]["content"]
    assert re.search(r"\b(eight|8)\b", ask(server, "How many legs does a spider have?")["message"]["content"])
    greeting = ask(server, "Hello! What can you do?")
    assert greeting["finish_reason"] == "stop" and "(noun)" not in greeting["message"]["content"]


@pytest.mark.parametrize("folder", ["default", "wordnet-mini"])
def test_eval_matches_the_card(folder, request, capsys):
    checkpoint = request.getfixturevalue("built") if folder == "default" else ROOT / "weights" / folder
    assert main(["eval", str(checkpoint), "--data", str(SLICE)]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = card_figure(checkpoint, "assistant-token loss, test slice")
    assert result["chats"] == 64
    assert abs(result["assistant_loss"] - expected) <= 0.05 * expected, (result["assistant_loss"], expected)


def test_build_refuses_a_missing_base_in_one_line(tmp_path):
    result = subprocess.run([*BUILD, "--gguf", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {tmp_path / 'absent.gguf'}: not found"
    assert not (tmp_path / "out").exists()


def test_recipe_dictionary_sample_is_seeded_text_records(tmp_path):
    """make_data.py --dictionary-entries: whole entries as {"text"} records, seeded, blind to any word list."""
    sys.path.insert(0, str(ROOT / "scripts" / "default_model"))
    from make_data import sample_dictionary

    entries = [f"word{i}\n(noun)\n1. the meaning of word {i}." for i in range(30)]
    with gzip.open(tmp_path / "wordnet-dictionary.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n\n".join(entries) + "\n")
    sample = sample_dictionary(tmp_path, 10, seed=0)
    assert len(sample) == 10 and len({record["text"] for record in sample}) == 10
    assert all(record["text"] in entries for record in sample)
    assert sample == sample_dictionary(tmp_path, 10, seed=0) != sample_dictionary(tmp_path, 10, seed=1)
    assert sorted(record["text"] for record in sample_dictionary(tmp_path, -1, seed=0)) == sorted(entries)
