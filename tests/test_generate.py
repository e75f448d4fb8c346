"""The reference generator and `hearth generate`."""

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.errors import HearthError
from model.generate import GenerationSettings, generate, sample_token
from cli.main import main


def naive_greedy(model, prompt, steps):
    """No cache at all: rerun the whole sequence for every token."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_greedy_with_cache_equals_no_cache(tiny_model_dir):
    model = load_checkpoint(tiny_model_dir).model
    prompt = [1, 50, 60, 70]
    out = list(generate(model, prompt, GenerationSettings(max_tokens=20, temperature=0)))
    assert out == naive_greedy(model, prompt, 20)


def test_seeded_sampling_reproduces(tiny_model_dir):
    model = load_checkpoint(tiny_model_dir).model
    settings = GenerationSettings(max_tokens=15, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    first = list(generate(model, [1, 5, 6], settings))
    assert first == list(generate(model, [1, 5, 6], settings))
    other = list(generate(model, [1, 5, 6], GenerationSettings(max_tokens=15, temperature=1.0, seed=8)))
    assert first != other


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([5.0, 4.0, 3.0, -10.0])
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_token(logits, GenerationSettings(top_k=2), generator) for _ in range(200)}
    assert drawn == {0, 1}
    drawn = {sample_token(logits, GenerationSettings(top_p=0.5), generator) for _ in range(50)}
    assert drawn == {0}


def test_stop_ids_end_generation(tiny_model_dir):
    model = load_checkpoint(tiny_model_dir).model
    greedy = list(generate(model, [1, 9], GenerationSettings(max_tokens=10, temperature=0)))
    stopped = list(generate(model, [1, 9], GenerationSettings(max_tokens=10, temperature=0, stop_ids=(greedy[3],))))
    assert stopped == greedy[: greedy.index(greedy[3])]


def test_prompt_longer_than_context_is_refused(tiny_model_dir):
    model = load_checkpoint(tiny_model_dir).model
    with pytest.raises(HearthError, match="the prompt has 300 tokens but the model's context is 256"):
        list(generate(model, [1] * 300, GenerationSettings()))


def test_cli_generate_greedy_and_chat(tiny_model_dir, capsys):
    assert main(["generate", str(tiny_model_dir), "--prompt", "To be", "--max-tokens", "8", "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("To be") and len(first) > len("To be\n")
    main(["generate", str(tiny_model_dir), "--prompt", "To be", "--max-tokens", "8", "--temperature", "0"])
    assert capsys.readouterr().out == first
    assert main(["generate", str(tiny_model_dir), "--prompt", "hi", "--chat", "--max-tokens", "4", "--seed", "1"]) == 0


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "checkpoint folder not found" in err and err.count("\n") == 1
    assert main(["generate", str(tiny_model_dir), "--prompt", "x", "--top-p", "0"]) == 1
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err
