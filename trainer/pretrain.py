"""`hearth pretrain`: data -> token cache -> model -> training loop -> checkpoint folder.

Design choices:
- Every option lives in `PretrainSettings`. The command line gives only what
  the user typed (argparse defaults are None); on `--resume` the rest comes
  from the checkpoint's recorded settings, so `hearth pretrain --out DIR
  --resume` continues a run without repeating its flags. Settings that would
  make the resume inexact or impossible (preset, seq len, data, tokenizer,
  seed) are checked, not silently changed.
- The output folder is protected: a folder that holds anything and is not
  being resumed is refused unless `--overwrite`; checkpoints are swapped in
  atomically, so an interrupted or failed run never leaves a corrupt folder.
- Under torchrun, rank 0 builds the tokenizer and token cache while the
  others wait at a barrier, then every rank opens the same memory map.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, read_metadata, read_safetensors
from model.config import PRESETS, ModelConfig
from model.errors import CheckpointError, ConfigError, HearthError
from model.tokenizer import Tokenizer, TokenizerInfo
from trainer.data import CleaningSettings, DataError, resolve_inputs
from trainer.distributed import DistributedContext, barrier, init_distributed, shutdown_distributed
from trainer.fast_model import TrainingTransformer
from trainer.loop import STATE_JSON, TrainConfig, TrainResult, train
from trainer.token_cache import TokenCache, TokenWindows, load_or_build_cache, train_tokenizer_cached

# Settings that must match the checkpoint when resuming (they shape the model or the data stream).
FIXED_ON_RESUME = ("preset", "seq_len", "data", "tokenizer", "vocab_size", "seed", "val_fraction", "min_chars",
                   "dedupe")


@dataclass
class PretrainSettings:
    out: str  # checkpoint folder to write
    data: list[str] = field(default_factory=list)  # files, folders, globs, datasets
    preset: str = "mini"  # model shape (model/config.py PRESETS)
    tokenizer: str | None = None  # folder (or file) with tokenizer.json; None: train one
    vocab_size: int = 8192  # when training a tokenizer
    seq_len: int | None = None  # tokens per sequence; None: the preset's context
    batch_tokens: int = 16384  # tokens per optimizer step (all ranks, via accumulation)
    micro_batch_size: int | None = None  # sequences per forward; None: about 4096 tokens' worth
    max_steps: int | None = None  # optimizer steps; or derived from `tokens`
    tokens: int | None = None  # training tokens, when max_steps is not given
    lr: float = 1e-3  # peak learning rate
    min_lr: float | None = None  # cosine floor; None: lr / 10
    warmup: int | None = None  # warmup steps; None: 5% of the steps (at most 500)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int | None = None  # None: 10 times per run
    eval_batches: int = 8
    save_every: int | None = None  # None: 10 times per run
    val_fraction: float = 0.01  # share of tokens held out for validation
    min_chars: int = 16  # minimum document length after cleaning
    dedupe: bool = True
    strict: bool = False  # stop at the first bad JSONL line
    cache_dir: str = ".hearth-cache"
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 where the device runs it fast, else float32
    compile: bool = False
    fsdp: bool = False
    seed: int = 0
    log_file: str | None = None
    stop_at: int | None = None  # end this invocation at this step (checkpoint; schedule unchanged)
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_pretrain(given: dict[str, Any]) -> int:
    """Entry point of the command: `given` holds the options the user typed."""
    out = Path(given["out"])
    saved = _saved_settings(out) if given.get("resume") else {}
    settings = _merge_settings(given, saved)
    context, device = init_distributed(pick_device(settings.device), settings.fsdp)
    try:
        result = _pretrain(settings, saved, context, device)
        barrier(context)  # all ranks done before the group goes: gloo aborts a rank whose peer tears it down early
    finally:
        shutdown_distributed()
    if result.interrupted:
        if context.is_main:
            log(f"interrupted ({result.interrupted}): checkpoint at step {result.steps} in {out}; "
                f"continue with: hearth pretrain --out {out} --resume")
        return 130 if result.interrupted == "SIGINT" else 143
    return 0


def _saved_settings(out: Path) -> dict[str, Any]:
    metadata = read_metadata(out)
    if not (out / STATE_JSON).is_file():
        raise CheckpointError(f"{out}: no {STATE_JSON}, nothing to resume (it was not written by hearth pretrain)")
    settings = metadata.get("training", {}).get("settings")
    if not isinstance(settings, dict):
        raise CheckpointError(f"{out / CONFIG_FILE}: no recorded pretrain settings; cannot --resume this folder")
    return settings


def _merge_settings(given: dict[str, Any], saved: dict[str, Any]) -> PretrainSettings:
    """Typed options win; on resume the checkpoint's recorded settings fill the rest."""
    known = PretrainSettings.field_names()
    values = {k: v for k, v in saved.items() if k in known}
    for name in FIXED_ON_RESUME:
        if saved and given.get(name) is not None and given[name] != saved.get(name):
            raise CheckpointError(f"cannot resume: the checkpoint was trained with --{name.replace('_', '-')} "
                                  f"{saved.get(name)!r}, this run asks for {given[name]!r}")
    values.update({k: v for k, v in given.items() if k in known and v is not None})
    for per_invocation in ("stop_at", "overwrite", "resume", "progress", "log_file"):
        if given.get(per_invocation) is None:
            values.pop(per_invocation, None)
    values["resume"] = bool(given.get("resume"))
    return PretrainSettings(**values)


def pick_device(device: str) -> str:
    """--device as given, with auto resolved (cuda when available, else cpu); unavailable CUDA is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HearthError(f"--device {device}: CUDA is not available on this machine")
    return device


def default_dtype(device: str) -> str:
    """bfloat16 where it is fast (CUDA with bf16, CPUs with AVX-512 BF16 or AMX), else float32."""
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "float32"
        return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"
    return "float32"


def _pretrain(settings: PretrainSettings, saved: dict[str, Any], context: DistributedContext,
              device: str) -> TrainResult:
    out = Path(settings.out)
    _check_settings(settings)
    if not settings.resume:
        _check_output_folder(out, settings.overwrite)
    sources = resolve_inputs(settings.data)
    cleaning = CleaningSettings(settings.min_chars, settings.dedupe, settings.strict)
    main_log = log if context.is_main else (lambda message: None)
    tokenizer = _main_first(context, lambda: _load_tokenizer(settings, sources, cleaning, out, main_log))
    cache = _main_first(context, lambda: load_or_build_cache(
        sources, tokenizer, cleaning, settings.val_fraction, Path(settings.cache_dir), main_log))
    model_config = _model_config(settings, tokenizer)
    model = _build_model(model_config, settings, out)
    config = _train_config(settings, device, context, cache)
    train_data = TokenWindows(cache, "train", config_seq_len(settings), seed=settings.seed)
    val_data = _validation_windows(cache, settings, main_log)
    main_log(f"data: {cache.split_tokens('train'):,} training tokens, {cache.split_tokens('val'):,} validation "
             f"tokens; {config.max_steps:,} steps x {config.batch_size * config_seq_len(settings):,} tokens = "
             f"{config.max_steps * config.batch_size * config_seq_len(settings) / cache.split_tokens('train'):.2f} epochs")
    run_info = _run_info(settings, cache, tokenizer)
    return train(model, train_data, val_data, config, out, tokenizer, resume=settings.resume,
                 run_info=run_info, context=context)


def _main_first(context: DistributedContext, build):
    """Rank 0 builds (tokenizer, token cache); the other ranks wait, then load the cached result."""
    if context.is_main:
        result = build()
        barrier(context)
        return result
    barrier(context)
    return build()


def config_seq_len(settings: PretrainSettings) -> int:
    return settings.seq_len or PRESETS[settings.preset]["max_seq_len"]


def _check_settings(settings: PretrainSettings) -> None:
    if settings.preset not in PRESETS:
        raise ConfigError(f"--preset {settings.preset}: unknown preset; choose one of: {', '.join(PRESETS)}")
    context = PRESETS[settings.preset]["max_seq_len"]
    seq_len = config_seq_len(settings)
    if not 1 <= seq_len <= context:
        raise ConfigError(f"--seq-len {seq_len}: must be between 1 and the {settings.preset} preset's context "
                          f"of {context} tokens")
    if settings.max_steps is None and settings.tokens is None:
        raise ConfigError("give --max-steps or --tokens (how long to train)")
    for name in ("batch_tokens", "max_steps", "tokens", "micro_batch_size", "eval_batches"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    if not settings.lr > 0:
        raise ConfigError(f"--lr {settings.lr}: must be positive")
    if not 0 <= settings.val_fraction < 0.5:
        raise ConfigError(f"--val-fraction {settings.val_fraction}: must be in [0, 0.5)")
    if settings.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"--dtype {settings.dtype}: choose auto, float32 or bfloat16")


def _check_output_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HearthError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "another model" if (out / CONFIG_FILE).is_file() else "files"
        raise HearthError(f"--out {out}: already holds {what}; pass --overwrite to replace it, "
                          "or --resume to continue its training")


def _load_tokenizer(settings: PretrainSettings, sources, cleaning, out: Path, log_fn) -> Tokenizer:
    if settings.resume:
        return _tokenizer_from_folder(out)
    if settings.tokenizer:
        return _tokenizer_from_folder(Path(settings.tokenizer))
    return train_tokenizer_cached(sources, cleaning, settings.vocab_size, Path(settings.cache_dir), log=log_fn)


def _tokenizer_from_folder(path: Path) -> Tokenizer:
    """tokenizer.json of a folder (with special tokens from its config.json when there is one)."""
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"--tokenizer {path}: no {TOKENIZER_FILE} there")
    info = None
    if (file.parent / CONFIG_FILE).is_file():
        try:
            info = TokenizerInfo.from_dict(json.loads((file.parent / CONFIG_FILE).read_text()).get("tokenizer", {}))
        except (json.JSONDecodeError, AttributeError):
            info = None
    return Tokenizer.load(file, info)


def _model_config(settings: PretrainSettings, tokenizer: Tokenizer) -> ModelConfig:
    return ModelConfig.from_preset(settings.preset, vocab_size=tokenizer.vocab_size)


def _build_model(config: ModelConfig, settings: PretrainSettings, out: Path) -> TrainingTransformer:
    """Fresh weights, or on resume the checkpoint's (copied into fp32 training tensors)."""
    model = TrainingTransformer(config)  # the decoder with a fused training forward; same weights
    if not settings.resume:
        return model.init_weights(settings.seed)
    saved_config = read_metadata(out).get("model", {})
    if saved_config != config.to_dict():
        differing = [k for k in config.to_dict() if saved_config.get(k) != config.to_dict()[k]]
        raise CheckpointError(f"cannot resume: {out} holds a different model ({', '.join(differing)} differ)")
    state = read_safetensors(out / WEIGHTS_FILE)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model


def _train_config(settings: PretrainSettings, device: str, context: DistributedContext,
                  cache: TokenCache) -> TrainConfig:
    seq_len = config_seq_len(settings)
    world = context.world_size
    micro = settings.micro_batch_size or max(1, 4096 // seq_len)
    rows = max(1, round(settings.batch_tokens / seq_len))
    micro = min(micro, math.ceil(rows / world))
    rows = math.ceil(rows / (micro * world)) * micro * world  # whole micro-batches on every rank
    max_steps = settings.max_steps or max(1, math.ceil(settings.tokens / (rows * seq_len)))
    warmup = settings.warmup if settings.warmup is not None else min(500, max_steps // 20)
    every = max(1, max_steps // 10)
    dtype = settings.dtype if settings.dtype != "auto" else default_dtype(device)
    return TrainConfig(
        max_steps=max_steps, batch_size=rows, micro_batch_size=micro, lr=settings.lr, min_lr=settings.min_lr,
        warmup_steps=warmup, weight_decay=settings.weight_decay, grad_clip=settings.grad_clip,
        eval_every=settings.eval_every if settings.eval_every is not None else every,
        eval_batches=settings.eval_batches,
        save_every=settings.save_every if settings.save_every is not None else every,
        dtype=dtype, device=device, compile=settings.compile, seed=settings.seed, progress=settings.progress,
        log_file=settings.log_file, stop_at=settings.stop_at)


def _validation_windows(cache: TokenCache, settings: PretrainSettings, log_fn) -> TokenWindows | None:
    if not cache.ranges("val"):
        return None
    try:
        return TokenWindows(cache, "val", config_seq_len(settings), seed=settings.seed)
    except DataError as exc:
        log_fn(f"warning: no validation ({exc}); raise --val-fraction")
        return None


def _run_info(settings: PretrainSettings, cache: TokenCache, tokenizer: Tokenizer) -> dict[str, Any]:
    recorded = {k: v for k, v in dataclasses.asdict(settings).items()
                if k not in ("out", "overwrite", "resume", "progress", "stop_at", "log_file")}
    return {
        "command": "pretrain", "preset": settings.preset, "seq_len": config_seq_len(settings),
        "data": {"sources": cache.meta["sources"], "tokens": cache.num_tokens,
                 "train_tokens": cache.split_tokens("train"), "val_tokens": cache.split_tokens("val"),
                 "cache_key": cache.key, "cleaning": cache.meta["cleaning_stats"]},
        "tokenizer_vocab_size": tokenizer.vocab_size, "settings": recorded,
    }
