"""Server settings: one pydantic-settings model fed by defaults < `HEARTH_*` env vars < CLI flags.

    settings = settings_from_args(args)      # after add_settings_arguments(parser)
    print(settings.describe())               # once at start-up; the API key shows as "set"

Design choices:
- Every knob is a field of `ServerSettings`; the env var is `HEARTH_<FIELD>`
  (HEARTH_API_KEY, HEARTH_PORT, ...) and the flag is `--<field-with-dashes>`,
  both derived from the field, so the two can never drift apart.
- Lists (`models`, `cors_origins`) read as comma-separated strings from the
  environment (`HEARTH_MODELS=weights/a,weights/b`) as well as JSON lists.
- Safe by default: binds 127.0.0.1 (a local server), no CORS, no key. The
  Docker image sets HEARTH_HOST=0.0.0.0 because it is reached through a port map.
- `api_key` is a `SecretStr`, so it never appears in reprs, logs or
  `describe()`; compare it with `secrets.compare_digest` (see server/auth.py).
- Bad values fail at start-up with one line naming the field (`SettingsError`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.errors import HearthError

ENV_PREFIX = "HEARTH_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class SettingsError(HearthError):
    """A setting (flag or HEARTH_* variable) with an impossible value."""


def _split_commas(value: Any) -> Any:
    """'a,b' or '["a","b"]' -> ['a', 'b']; lists pass through."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class ServerSettings(BaseSettings):
    """Everything `hearth serve` can be told. Field docs double as `--help` text."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    # Network
    host: str = Field("127.0.0.1", description="interface to bind; 0.0.0.0 exposes the server to the network")
    port: int = Field(8080, ge=1, le=65535, description="TCP port")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["weights/default"],
        description="checkpoint folders to serve, comma-separated; NAME=PATH sets the model id "
        "(default: the folder name)",
    )
    api_key: SecretStr | None = Field(None, description="require `Authorization: Bearer KEY` on every route but /health and /")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS, comma-separated, '*' for any (default: CORS off)"
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body accepted (413 above)")

    # Model management (server/registry.py, server/ollama/management.py)
    models_dir: str | None = Field(None, description="weights folder: serve every checkpoint folder and .gguf file in it, "
                                   "loaded on first request; /api/create keeps its models there")
    keep_alive: str = Field("5m", description="how long a model loaded on demand stays loaded after its last request "
                            "(5m, 30s, 1h; 0 unloads at once, -1 never); models named with --model stay loaded")
    max_loaded_models: int | None = Field(None, ge=1, description="most models loaded at once; the least recently used "
                                          "idle one is unloaded first (default: 3, or the number of --model entries)")

    # Engine
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = Field("auto", description="compute dtype: auto, bfloat16 or float32 (never float16 on CPU)")
    max_num_seqs: int = Field(64, ge=1, description="most sequences decoded together in one step")
    max_num_batched_tokens: int = Field(2048, ge=16, description="token budget of one engine step (prefill chunks + decodes)")
    max_waiting: int = Field(256, ge=0, description="bounded admission queue; beyond it requests get 429")
    kv_cache_blocks: int | None = Field(None, ge=1, description="KV cache size in blocks (default: from kv_cache_memory_gb)")
    kv_cache_memory_gb: float = Field(2.0, gt=0, description="KV cache budget in GiB when kv_cache_blocks is not set")
    enable_prefix_caching: bool = Field(True, description="reuse the KV of identical prompt prefixes")
    block_size: int = Field(16, ge=1, description="tokens per KV cache block")
    pooling: str = Field("mean", description="embeddings: mean (over the input's final hidden states) or last (token)")
    embed_normalize: bool = Field(True, description="embeddings: L2-normalize vectors (a request's embd_normalize overrides)")

    # LoRA adapters (server/adapters/api.py)
    lora: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="LoRA adapter to serve as model NAME: NAME=ADAPTER_DIR (repeatable; "
        "Hearth or PEFT folder)")
    weights_dir: str = Field("weights", description="folder POST /v1/load_lora_adapter may read adapters from")
    max_lora_rank: int = Field(64, ge=1, description="largest LoRA adapter rank accepted")

    # State
    data_dir: str = Field("~/.hearth", description="folder for server state: stored /v1/responses (SQLite, created on first use)")
    responses_max_count: int = Field(1000, ge=1, description="stored responses kept at most (oldest dropped first)")
    responses_max_age_days: float = Field(30.0, gt=0, description="stored responses older than this are dropped")

    # Process
    log_level: str = Field("info", description="critical, error, warning, info or debug")
    shutdown_timeout: float = Field(10.0, ge=0, description="seconds running streams get to finish on SIGTERM before they are cancelled")

    _split_lists = field_validator("models", "cors_origins", "lora", mode="before")(_split_commas)

    @model_validator(mode="after")
    def _models_or_folder(self) -> "ServerSettings":
        if self.models_dir is not None and "models" not in self.model_fields_set:
            self.models = []  # --models-dir alone: no default checkpoint
        if not self.models and self.models_dir is None:
            raise ValueError("models: at least one checkpoint folder is needed (or --models-dir)")
        if self.max_loaded_models is not None and self.max_loaded_models < len(self.models):
            raise ValueError(f"max_loaded_models ({self.max_loaded_models}) is below the number of --model entries "
                             f"({len(self.models)}), which are all loaded at start-up")
        return self

    @field_validator("keep_alive")
    @classmethod
    def _known_duration(cls, keep_alive: str) -> str:
        from server.keep_alive import parse_keep_alive

        parse_keep_alive(keep_alive, "keep_alive")
        return keep_alive

    @property
    def loaded_models_limit(self) -> int:
        return self.max_loaded_models or max(3, len(self.models))

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, dtype: str) -> str:
        if dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"must be auto, bfloat16 or float32, got {dtype!r}")
        return dtype

    @field_validator("pooling")
    @classmethod
    def _known_pooling(cls, pooling: str) -> str:
        if pooling not in ("mean", "last"):
            raise ValueError(f"must be mean or last, got {pooling!r}")
        return pooling

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, level: str) -> str:
        if level.lower() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
        return level.lower()

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, key: SecretStr | None) -> SecretStr | None:
        return key if key is not None and key.get_secret_value() else None

    def model_entries(self) -> list[tuple[str, Path]]:
        """(model id, checkpoint folder) per `models` entry; `NAME=PATH` names it explicitly."""
        entries = []
        for entry in self.models:
            name, sep, path = entry.partition("=")
            if not sep:
                name, path = Path(entry.rstrip("/")).name, entry
            entries.append((name, Path(path)))
        names = [name for name, _ in entries]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise SettingsError(f"models: model id {duplicates[0]!r} is used twice (name them with NAME=PATH)")
        return entries

    def describe(self) -> str:
        """One line per setting for the start-up banner; secrets show as 'set' / 'not set'."""
        lines = []
        for name, value in self.model_dump().items():
            if name == "api_key":
                value = "set" if self.api_key is not None else "not set"
            lines.append(f"  {name} = {value}")
        return "settings:\n" + "\n".join(lines)


def load_settings(**overrides: Any) -> ServerSettings:
    """Build settings from HEARTH_* variables plus explicit overrides; errors become one line."""
    try:
        return ServerSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a check across fields: its message names them
            raise SettingsError(f"settings: {first['msg'].removeprefix('Value error, ')}") from None
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        env_name = ENV_PREFIX + str(first["loc"][0]).upper() if first["loc"] else ""
        raise SettingsError(f"setting {field} (--{field.replace('_', '-')} / {env_name}): {first['msg']}") from None
    except ValueError as exc:  # a malformed JSON list in the environment
        raise SettingsError(f"settings: {exc}") from None


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per field; unset flags stay None so env vars and defaults show through."""
    for name, info in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description} [env {ENV_PREFIX}{name.upper()}]"
        if name == "models":
            parser.add_argument("--model", "--models", dest=name, action="append", default=None, help=help_text)
        elif name == "lora":
            parser.add_argument(flag, dest=name, action="append", default=None, help=help_text)
        elif info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Settings with the flags given on the command line taking precedence over the environment."""
    overrides = {}
    for name in ServerSettings.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    for name in ("models", "lora"):  # repeated --model / --lora flags, each possibly comma-separated
        if name in overrides:
            overrides[name] = [part for value in overrides[name] for part in _split_commas(value)]
    return load_settings(**overrides)
