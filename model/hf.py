"""Hugging Face interop: `hearth import-hf` and `hearth export-hf`.

A Llama checkpoint as `transformers` writes it (config.json, safetensors
weights, tokenizer.json, tokenizer_config.json, generation_config.json)
converts to a Hearth checkpoint folder and back.

Design choices:
- Weights are renamed, never permuted: Hearth's decoder uses the same weight
  layout and the same rotate-half RoPE convention as `LlamaForCausalLM`.
- Only what Hearth computes exactly is accepted. Anything else (another
  architecture, biases, another activation, a RoPE type other than default or
  llama3, a head_dim that is not dim / n_heads, pre-quantized weights) is
  refused with a one-line error naming the field, rather than converted into a
  model that silently computes something else.
- Import streams: every shard is memory-mapped (copy-on-write) and its tensors
  are handed to the meta-device model one by one; a tensor is copied only when
  its dtype changes, so peak memory is one copy of the model at most, and none
  when the dtype is kept.
- Both config.json dialects are read: transformers < 5 (`rope_theta`,
  `rope_scaling`, `torch_dtype`) and >= 5 (`rope_parameters`, `dtype`). Export
  writes both, so old and new transformers load the folder without warnings.
- BOS follows the model's tokenizer (`hf_adds_bos`): a prompt starts with BOS
  only where transformers' tokenizer(text) would put one.
- The tokenizer file is used as is. Imported models keep their Jinja chat
  template; export writes a Jinja template that renders Hearth's own template
  (model/chat.py) so `apply_chat_template` yields the same ids.
- torch is imported inside the functions that need it, so `hearth --help`
  stays fast.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.config import ModelConfig, RopeScaling
from model.errors import HearthError
from model.tokenizer import ASSISTANT, END, SYSTEM, USER, TokenizerInfo

if TYPE_CHECKING:
    import torch

    from model.decoder import Transformer
    from model.tokenizer import Tokenizer

HF_ARCHITECTURE = "LlamaForCausalLM"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_CHAT_TEMPLATE = "chat_template.jinja"
MODEL_CARD = "README.md"
DTYPE_CHOICES = ("float32", "bfloat16")

# Per-layer tensor names: Hugging Face suffix -> Hearth suffix (".weight" follows both).
_LAYER_NAMES = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
}
_TOP_NAMES = {"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "lm_head"}


class HFInteropError(HearthError):
    """A Hugging Face folder Hearth cannot import, or a checkpoint it cannot export."""


# ----------------------------------------------------------------------------- names


def hf_to_hearth_name(name: str) -> str | None:
    """Hearth name of a Hugging Face tensor; None for tensors Hearth recomputes (rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):  # saved by old transformers; derived from config
        return None
    stem, dot, kind = name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}{dot}{kind}"
    parts = stem.split(".", 3)  # model.layers.N.<suffix>
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"layers.{parts[2]}.{_LAYER_NAMES[parts[3]]}{dot}{kind}"
    raise HFInteropError(f"tensor {name} is not part of a {HF_ARCHITECTURE}")


def hearth_to_hf_name(name: str) -> str:
    stem, dot, kind = name.rpartition(".")
    top = {v: k for k, v in _TOP_NAMES.items()}
    if stem in top:
        return f"{top[stem]}{dot}{kind}"
    _, layer, suffix = stem.split(".", 2)  # layers.N.<suffix>
    hf_suffix = {v: k for k, v in _LAYER_NAMES.items()}[suffix]
    return f"model.layers.{layer}.{hf_suffix}{dot}{kind}"


# ----------------------------------------------------------------------------- config.json (import)


def read_json(file: Path, required: bool = True) -> dict[str, Any]:
    if not file.is_file():
        if required:
            raise HFInteropError(f"{file}: missing (not a Hugging Face model folder?)")
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HFInteropError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise HFInteropError(f"{file}: expected a JSON object")
    return data


def check_supported(hf_config: dict[str, Any], file: Path) -> None:
    """Refuse anything Hearth's decoder would not compute exactly."""
    architectures = hf_config.get("architectures") or []
    if architectures and architectures != [HF_ARCHITECTURE]:
        raise HFInteropError(f"{file}: architecture {', '.join(map(str, architectures))} is not supported, "
                             f"expected {HF_ARCHITECTURE}")
    if not architectures and hf_config.get("model_type") != "llama":
        raise HFInteropError(f"{file}: model_type {hf_config.get('model_type')!r} is not supported, "
                             f"expected {HF_ARCHITECTURE} (model_type \"llama\")")
    for field in ("attention_bias", "mlp_bias"):
        if hf_config.get(field):
            raise HFInteropError(f"{file}: {field}=true is not supported (Hearth's Llama has no biases)")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise HFInteropError(f"{file}: hidden_act {hf_config['hidden_act']!r} is not supported, expected \"silu\"")
    if hf_config.get("quantization_config"):
        raise HFInteropError(f"{file}: pre-quantized weights (quantization_config) are not supported; "
                             "import the unquantized model and use `hearth quantize`")


def _required(hf_config: dict[str, Any], field: str, file: Path) -> Any:
    if field not in hf_config:
        raise HFInteropError(f"{file}: missing field {field}")
    return hf_config[field]


def _number(mapping: dict[str, Any], key: str, where: str, file: Path, default: Any = None) -> float:
    value = mapping.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HFInteropError(f"{file}: {where}{key} must be a number, got {value!r}")
    return value


def rope_from_hf(hf_config: dict[str, Any], file: Path) -> tuple[float, RopeScaling | None]:
    """(rope_theta, llama3 scaling or None) from either config.json dialect."""
    params = hf_config.get("rope_parameters")  # transformers >= 5
    if isinstance(params, dict):
        scaling, field = params, "rope_parameters"
        theta = _number(params, "rope_theta", "rope_parameters.", file, hf_config.get("rope_theta", 10000.0))
    else:  # transformers < 5: rope_theta at the top, optional rope_scaling
        scaling, field = hf_config.get("rope_scaling"), "rope_scaling"
        theta = _number(hf_config, "rope_theta", "", file, 10000.0)
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise HFInteropError(f"{file}: {field} must be an object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFInteropError(f"{file}: {field}.partial_rotary_factor is not supported "
                             "(Hearth rotates the whole head)")
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise HFInteropError(f"{file}: {field} rope_type {rope_type!r} is not supported, "
                             "expected \"default\" or \"llama3\"")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise HFInteropError(f"{file}: {field} is missing {key} (needed by rope_type \"llama3\")")
        _number(scaling, key, f"{field}.", file)
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def model_config_from_hf(hf_config: dict[str, Any], file: Path) -> ModelConfig:
    check_supported(hf_config, file)
    dim = _required(hf_config, "hidden_size", file)
    n_heads = _required(hf_config, "num_attention_heads", file)
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and isinstance(dim, int) and isinstance(n_heads, int) and head_dim * n_heads != dim:
        raise HFInteropError(f"{file}: head_dim={head_dim} is not hidden_size/num_attention_heads "
                             f"({dim}/{n_heads}); Hearth derives head_dim from them")
    rope_theta, rope_scaling = rope_from_hf(hf_config, file)
    try:
        return ModelConfig(
            dim=dim,
            n_layers=_required(hf_config, "num_hidden_layers", file),
            n_heads=n_heads,
            n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,
            ffn_dim=_required(hf_config, "intermediate_size", file),
            vocab_size=_required(hf_config, "vocab_size", file),
            max_seq_len=hf_config.get("max_position_embeddings", 2048),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            norm_eps=float(_number(hf_config, "rms_norm_eps", "", file, 1e-6)),
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        )
    except HearthError as exc:
        raise HFInteropError(f"{file}: {exc}") from None


def source_dtype(hf_config: dict[str, Any]) -> str | None:
    """The dtype config.json declares (`dtype` in transformers >= 5, `torch_dtype` before)."""
    return hf_config.get("dtype") or hf_config.get("torch_dtype")


# ----------------------------------------------------------------------------- weights (import)


def hf_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model: one file, or the shards an index names."""
    index_file = folder / HF_WEIGHTS_INDEX
    if index_file.is_file():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFInteropError(f"{index_file}: no weight_map")
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = next((shard for shard in shards if not shard.is_file()), None)
        if missing is not None:
            raise HFInteropError(f"{missing}: missing (named by {HF_WEIGHTS_INDEX})")
        return shards
    if (folder / HF_WEIGHTS).is_file():
        return [folder / HF_WEIGHTS]
    if any(folder.glob("pytorch_model*.bin")):
        raise HFInteropError(f"{folder / HF_WEIGHTS}: missing; only safetensors weights are imported "
                             "(pytorch_model.bin is a pickle, which Hearth never loads)")
    raise HFInteropError(f"{folder / HF_WEIGHTS}: missing (nor is there a {HF_WEIGHTS_INDEX})")


def load_hf_weights(model: Transformer, files: list[Path], dtype: torch.dtype) -> None:
    """Fill a meta-device model from safetensors shards, shard by shard, tensor by tensor."""
    from model.checkpoint import read_safetensors

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = model.config.tie_embeddings
    if tied:
        expected.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for hf_name, tensor in read_safetensors(file).items():  # copy-on-write mmap views
            try:
                name = hf_to_hearth_name(hf_name)
            except HFInteropError as exc:
                raise HFInteropError(f"{file}: {exc}") from None
            if name is None or (tied and name == "lm_head.weight"):
                continue  # recomputed, or the tied copy of embed_tokens
            if tuple(tensor.shape) != expected[name]:
                raise HFInteropError(f"{file}: tensor {hf_name} has shape {list(tensor.shape)} "
                                     f"but config.json expects {list(expected[name])}")
            state[name] = tensor.to(dtype)  # a copy only when the dtype changes
    missing = sorted(set(expected) - set(state))
    if missing:
        raise HFInteropError(f"{files[0].parent}: the weights have no tensor {hearth_to_hf_name(missing[0])}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.embed.weight


# ----------------------------------------------------------------------------- tokenizer (import)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def read_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The Jinja chat template: chat_template.jinja, else tokenizer_config.json's (default one)."""
    if (folder / HF_CHAT_TEMPLATE).is_file():
        return (folder / HF_CHAT_TEMPLATE).read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def tokenizer_info_from_hf(folder: Path, hf_config: dict[str, Any], id_to_token) -> TokenizerInfo:
    """BOS/EOS from tokenizer_config.json (else config.json ids); stop tokens = every EOS named."""
    tokenizer_config = read_json(folder / HF_TOKENIZER_CONFIG, required=False)
    generation_config = read_json(folder / HF_GENERATION_CONFIG, required=False)

    def token_for(field: str) -> str | None:
        text = _token_text(tokenizer_config.get(field))
        if text is None:
            ids = _id_list(hf_config.get(f"{field}_id"))
            text = id_to_token(ids[0]) if ids else None
        return text

    eos_token = token_for("eos_token")
    eos_ids = _id_list(generation_config.get("eos_token_id")) + _id_list(hf_config.get("eos_token_id"))
    stop_tokens = [eos_token] if eos_token else []
    for token in (id_to_token(i) for i in eos_ids):
        if token is not None and token not in stop_tokens:
            stop_tokens.append(token)
    return TokenizerInfo(
        bos_token=token_for("bos_token"),
        eos_token=eos_token,
        pad_token=token_for("pad_token"),
        chat_template="jinja",
        jinja_template=read_chat_template(folder, tokenizer_config),
        stop_tokens=stop_tokens,
    )


def hf_adds_bos(backend, bos_token: str | None) -> bool:
    """Whether transformers' tokenizer(text) starts with BOS: what the tokenizer.json post-processor
    does (none: no BOS). transformers 5 rebuilds the post-processor from tokenizer_config.json's
    add_bos_token only for a tokenizer that has none, and then without BOS, so the file decides."""
    bos_id = backend.token_to_id(bos_token) if bos_token is not None else None
    if bos_id is None or backend.post_processor is None:
        return False
    with_specials = backend.encode("a", add_special_tokens=True).ids
    return with_specials[:1] == [bos_id] and backend.encode("a", add_special_tokens=False).ids[:1] != [bos_id]


# ----------------------------------------------------------------------------- import-hf


def check_output_folder(out: Path, source: Path, overwrite: bool) -> None:
    """Never replace the source, a model without --overwrite, or a folder that is not a model."""
    if out.resolve() == source.resolve():
        raise HFInteropError(f"--out {out}: is the input folder; choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise HFInteropError(f"--out {out}: exists and is not a folder")
    holds_model = (out / "config.json").is_file()
    if holds_model and not overwrite:
        raise HFInteropError(f"--out {out}: already holds a model; pass --overwrite to replace it")
    if not holds_model and any(out.iterdir()):
        raise HFInteropError(f"--out {out}: exists and is not a model folder; refusing to replace it")


def import_hf(hf_dir: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Convert a Hugging Face Llama folder into a Hearth checkpoint folder; returns its path."""
    import torch

    from model.checkpoint import DTYPES, save_checkpoint
    from model.decoder import Transformer, rope_inverse_frequencies
    from model.tokenizer import Tokenizer

    folder, out = Path(hf_dir), Path(out)
    if not folder.is_dir():
        raise HFInteropError(f"{folder}: folder not found")
    hf_config = read_json(folder / HF_CONFIG)
    config = model_config_from_hf(hf_config, folder / HF_CONFIG)
    weight_files = hf_weight_files(folder)
    backend = Tokenizer.load(folder / HF_TOKENIZER).backend
    info = tokenizer_info_from_hf(folder, hf_config, backend.id_to_token)
    info.add_bos = hf_adds_bos(backend, info.bos_token)
    tokenizer = recognise_hearth_template(Tokenizer(backend, info))
    check_output_folder(out, folder, overwrite)
    dtype = dtype or _default_import_dtype(source_dtype(hf_config))
    with torch.device("meta"):
        model = Transformer(config)
    load_hf_weights(model, weight_files, DTYPES[dtype])
    model.inv_freq = rope_inverse_frequencies(config)
    card = (folder / MODEL_CARD).read_text(encoding="utf-8") if (folder / MODEL_CARD).is_file() else None
    source = {"format": "transformers", "architecture": HF_ARCHITECTURE, "dtype": source_dtype(hf_config)}
    return save_checkpoint(out, model.eval(), tokenizer, extra_metadata={"imported_from": source},
                           model_card=card)


def recognise_hearth_template(tokenizer: Tokenizer) -> Tokenizer:
    """A folder export-hf wrote gets Hearth's own (id-built) template back, not its Jinja copy."""
    from model.tokenizer import Tokenizer

    info = tokenizer.info
    if not _uses_hearth_markers(tokenizer) or info.jinja_template != hearth_chat_template_jinja(tokenizer):
        return tokenizer
    info = TokenizerInfo(bos_token=info.bos_token, eos_token=info.eos_token, pad_token=info.pad_token,
                         chat_template="hearth", stop_tokens=info.stop_tokens, add_bos=info.add_bos)
    return Tokenizer(tokenizer.backend, info)


def _default_import_dtype(declared: str | None) -> str:
    # float16 is slow on CPU and overflows more easily than bfloat16, which keeps its range.
    return declared if declared in DTYPE_CHOICES else "bfloat16" if declared == "float16" else "float32"


# ----------------------------------------------------------------------------- export-hf


def hf_config_from_model(config: ModelConfig, tokenizer: Tokenizer, dtype: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM, readable by transformers 4.x (rope_scaling,
    torch_dtype) and 5.x (rope_parameters, dtype)."""
    scaling = None
    if config.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **vars(config.rope_scaling)}
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta},
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def hearth_chat_template_jinja(tokenizer: Tokenizer) -> str:
    """Jinja rendering of model/chat.py's template; tokenised, it gives encode_chat's ids."""
    markers = {role: token for role, token in (("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT))}
    bos = "{{ bos_token }}" if tokenizer.adds_bos else ""
    role_check = (
        "{% if message['role'] not in " + repr(list(markers)) + " %}"
        "{{ raise_exception('unknown role ' + message['role'] + ', expected system, user or assistant') }}"
        "{% endif %}"
    )
    content = (  # a string, or a list of text parts joined (as model/chat.message_text does)
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% elif message['content'] is not none %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
        "{% endif %}"
    )
    return (
        bos + "{% for message in messages %}" + role_check
        + "{{ '<|' + message['role'] + '|>\\n' }}" + content + "{{ '" + END + "\\n' }}"
        + "{% endfor %}{% if add_generation_prompt %}{{ '" + ASSISTANT + "\\n' }}{% endif %}"
    )


def _uses_hearth_markers(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.backend.token_to_id(t) is not None for t in (SYSTEM, USER, ASSISTANT, END))


def export_tokenizer_files(tokenizer: Tokenizer, max_seq_len: int) -> dict[str, Any]:
    """tokenizer.json (a BOS post-processor added where none exists) and tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    info = tokenizer.info
    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    if backend.post_processor is None and tokenizer.adds_bos:
        # Hearth prompts start with BOS (encode(add_bos=True)); make tokenizer(text) do the same.
        bos = info.bos_token
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
    if info.chat_template == "hearth" and _uses_hearth_markers(tokenizer):
        template = hearth_chat_template_jinja(tokenizer)
    else:
        template = info.jinja_template if info.chat_template == "jinja" else None
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": info.bos_token if tokenizer.bos_id is not None else None,
        "eos_token": info.eos_token if tokenizer.eos_id is not None else None,
        "pad_token": info.pad_token if tokenizer.pad_id is not None else None,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
        **({"chat_template": template} if template else {}),
    }
    return {"backend": backend, "tokenizer_config": tokenizer_config}


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    stop_ids = list(dict.fromkeys(([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + tokenizer.stop_ids))
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else stop_ids or None,
        "pad_token_id": tokenizer.pad_id,
    }


def export_hf(checkpoint_dir: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write a Hearth checkpoint as a transformers LlamaForCausalLM folder; returns its path."""
    from safetensors.torch import save_file

    from model.checkpoint import DTYPES, load_checkpoint, model_state_dict, read_metadata, write_folder_atomically

    folder, out = Path(checkpoint_dir), Path(out)
    metadata = read_metadata(folder)
    if metadata.get("quantization"):
        raise HFInteropError(f"{folder / 'config.json'}: the checkpoint is quantized; export-hf needs an "
                             "unquantized (float32 or bfloat16) checkpoint")
    dtype = dtype or (metadata.get("dtype") if metadata.get("dtype") in DTYPE_CHOICES else "float32")
    check_output_folder(out, folder, overwrite)
    checkpoint = load_checkpoint(folder, dtype=DTYPES[dtype])
    tokenizer, config = checkpoint.tokenizer, checkpoint.config
    state = {hearth_to_hf_name(name): tensor for name, tensor in model_state_dict(checkpoint.model).items()}
    tokenizer_files = export_tokenizer_files(tokenizer, config.max_seq_len)
    json_files = {
        HF_CONFIG: hf_config_from_model(config, tokenizer, dtype),
        HF_TOKENIZER_CONFIG: tokenizer_files["tokenizer_config"],
        HF_GENERATION_CONFIG: generation_config(tokenizer),
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        tokenizer_files["backend"].save(str(tmp / HF_TOKENIZER))
        for name, content in json_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if (folder / MODEL_CARD).is_file():
            shutil.copyfile(folder / MODEL_CARD, tmp / MODEL_CARD)

    return write_folder_atomically(out, write)


# ----------------------------------------------------------------------------- CLI


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("import-hf", help="convert a Hugging Face Llama folder into a Hearth checkpoint")
    parser.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json, *.safetensors, tokenizer.json")
    parser.add_argument("--out", required=True, metavar="DIR", help="Hearth checkpoint folder to write")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="weight dtype (default: the model's own; float16 becomes bfloat16)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    parser.set_defaults(handler=run_import)

    parser = commands.add_parser("export-hf", help="write a Hearth checkpoint as a Hugging Face Llama folder")
    parser.add_argument("checkpoint", metavar="DIR", help="Hearth checkpoint folder")
    parser.add_argument("--out", required=True, metavar="HF_DIR", help="Hugging Face folder to write")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="weight dtype (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    parser.set_defaults(handler=run_export)


def run_import(args: argparse.Namespace) -> int:
    out = import_hf(args.hf_dir, args.out, args.dtype, args.overwrite)
    print(f"imported {args.hf_dir} -> {out} ({_summary(out)})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    out = export_hf(args.checkpoint, args.out, args.dtype, args.overwrite)
    hf_config = json.loads((out / HF_CONFIG).read_text(encoding="utf-8"))
    print(f"exported {args.checkpoint} -> {out} ({HF_ARCHITECTURE}, {hf_config['num_hidden_layers']} layers, "
          f"dim {hf_config['hidden_size']}, {hf_config['dtype']})")
    return 0


def _summary(checkpoint_dir: str | Path) -> str:
    metadata = json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))
    config = ModelConfig.from_dict(metadata["model"])
    template = metadata["tokenizer"].get("chat_template")
    if template == "jinja" and not metadata["tokenizer"].get("jinja_template"):
        template = "none"
    return (f"{config.n_layers} layers, dim {config.dim}, {config.num_params() / 1e6:.1f}M params, "
            f"{metadata.get('dtype')}, chat template: {template}")
