"""Tokenizer round trips and the chat template."""

import pytest

from model.chat import ChatFormatError, encode_chat
from model.errors import TokenizerError
from model.tokenizer import ASSISTANT, END, SYSTEM, USER, Tokenizer

SAMPLES = [
    "Hello, world!",
    "中文测试：你好，世界。",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧",
    "def f(x):\n\treturn {'a': [1, 2]}  # comment\n",
    "   leading, inner   runs,\n\n\n trailing   ",
    "",
    "\x00\x07 control and \u200b zero width",
    "<|user|> text that looks like a marker <|end|>",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_user_text_never_produces_special_tokens(tokenizer):
    ids = tokenizer.encode("<|user|> hi <|end|><|eos|>")
    specials = {tokenizer.token_id(t) for t in (USER, END, "<|eos|>")}
    assert not specials & set(ids)


def test_any_vocab_size_and_specials(tokenizer):
    small = Tokenizer.train(iter(["abc abd abe " * 50]), vocab_size=300)
    assert small.vocab_size <= 300
    assert tokenizer.vocab_size == 512
    assert tokenizer.bos_id is not None and tokenizer.eos_id is not None and tokenizer.pad_id is not None
    assert tokenizer.token_id(END) in tokenizer.stop_ids


def test_too_small_vocab_is_refused():
    with pytest.raises(TokenizerError, match="--vocab-size must be at least"):
        Tokenizer.train(iter(["x"]), vocab_size=100)


def test_chat_template_layout_and_loss_mask(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Define cat."},
        {"role": "assistant", "content": "A small feline."},
    ]
    encoded = encode_chat(tokenizer, messages, add_generation_prompt=False)
    text = tokenizer.decode(encoded.ids, skip_special=False)
    assert text == (
        f"<|bos|>{SYSTEM}\nBe brief.{END}\n{USER}\nDefine cat.{END}\n{ASSISTANT}\nA small feline.{END}\n"
    )
    masked = [i for i, m in zip(encoded.ids, encoded.loss_mask) if m]
    assert tokenizer.decode(masked, skip_special=False) == f"A small feline.{END}"


def test_generation_prompt_ends_with_assistant_header(tokenizer):
    encoded = encode_chat(tokenizer, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert tokenizer.decode(encoded.ids, skip_special=False).endswith(f"{ASSISTANT}\n")
    assert not any(encoded.loss_mask)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "at least one message"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\].role: unknown role 'robot'"),
        ([{"role": "user", "content": 5}], r"messages\[0\].content"),
    ],
)
def test_bad_chats_name_the_message(tokenizer, messages, message):
    with pytest.raises(ChatFormatError, match=message):
        encode_chat(tokenizer, messages)


def test_imported_jinja_templates_render_like_transformers(tokenizer):
    from model.tokenizer import Tokenizer, TokenizerInfo

    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ bos_token }}{{ m['content'] | tojson }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    jinja = Tokenizer(tokenizer.backend, TokenizerInfo(chat_template="jinja", jinja_template=template))
    ids = encode_chat(jinja, [{"role": "user", "content": "<b>é</b>"}]).ids
    assert jinja.decode(ids, skip_special=False) == '<|bos|>"<b>é</b>"<|assistant|>'
    with pytest.raises(ChatFormatError, match="chat template: no system role"):
        encode_chat(jinja, [{"role": "system", "content": "x"}])
    base_model = Tokenizer(tokenizer.backend, TokenizerInfo(chat_template="jinja", jinja_template=None))
    with pytest.raises(ChatFormatError, match="no chat template"):
        encode_chat(base_model, [{"role": "user", "content": "x"}])
