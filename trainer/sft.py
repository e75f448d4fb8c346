"""Supervised fine-tuning on chats: reading, the loss mask, packing, and the SFT run.

Design choices:
- Chats are formatted by the model's own chat template (`model.chat.encode_chat`),
  the same code the server uses to build prompts, so training and serving
  can never disagree on a marker. The loss is on assistant tokens only:
  each reply and the `<|end|>` that closes it (the model must learn to stop).
  Jinja templates (models imported from Hugging Face) give no mask, so it is
  recovered by rendering the conversation up to each reply and diffing.
- Packing, not padding: the corpus chats are 40-80 tokens, so padding each
  to the sequence length would spend most of the compute on pad tokens.
  Rows are filled best-fit from a few open rows (every chat whole, never
  split across rows, so each reply keeps its question); utilisation is ~95% at 256 tokens.
  Attention stays plainly causal over the packed row, as in most trainers:
  every chat starts with `<|bos|>` and the model learns that what precedes it
  is unrelated, and the decoder keeps its fast `is_causal` attention instead of
  a per-row block-diagonal mask (which on CPU takes the slow masked kernel).
  Evaluation (`trainer/evaluate.py`) scores each chat alone, as it is served.
- Bad records (not JSON, no `messages`, unknown role, no assistant turn) are
  reported as `file:line: reason`; they are skipped and counted, or stop the
  run with `strict=True`. Too-long chats are truncated (dropped if no reply
  token is left) or dropped, and counted.
- The batch source's whole state is (seed, epoch, row cursor): an epoch's
  order and packing are recomputed from `seed + epoch`, so resume is exact.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from model.chat import ChatFormatError, encode_chat
from model.errors import HearthError
from model.tokenizer import Tokenizer

IGNORE_INDEX = -100  # target value that carries no loss (torch cross_entropy's default)
MAX_REPORTED_PROBLEMS = 5  # bad records printed one by one before only counting


class ChatDataError(HearthError):
    """A chat file that cannot be read, or a record that is not a usable chat."""


# --- reading ----------------------------------------------------------------------------


@dataclass
class ChatReadReport:
    """What happened to the records of the chat files."""

    chats: int = 0  # usable conversations
    skipped: int = 0  # records that were not valid chats
    truncated: int = 0  # chats cut at the sequence length
    dropped_long: int = 0  # chats dropped for length (or with no reply left after truncation)
    problems: list[str] = field(default_factory=list)  # "file:line: reason" of the first skipped records

    def note(self, location: str, reason: str, strict: bool) -> None:
        if strict:
            raise ChatDataError(f"{location}: {reason} (drop --strict to skip bad records)")
        self.skipped += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(f"{location}: {reason}")

    def summary(self) -> str:
        parts = [f"{self.chats} chats"]
        if self.skipped:
            parts.append(f"{self.skipped} bad records skipped")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.dropped_long:
            parts.append(f"{self.dropped_long} dropped as too long")
        return ", ".join(parts)


def open_text(path: Path):
    """A text handle on a plain or gzip-compressed file (by magic bytes, not the name)."""
    with open(path, "rb") as probe:
        is_gzip = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if is_gzip else open(path, encoding="utf-8")


def iter_json_lines(path: Path, report: ChatReadReport, strict: bool) -> Iterator[tuple[str, Any]]:
    """(location "file:line", parsed record) for every non-blank line; bad JSON is noted."""
    if not path.is_file():
        raise ChatDataError(f"{path}: file not found")
    try:
        with open_text(path) as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                location = f"{path}:{line_number}"
                try:
                    yield location, json.loads(line)
                except json.JSONDecodeError as exc:
                    report.note(location, f"not valid JSON ({exc.msg} at column {exc.colno})", strict)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ChatDataError(f"{path}: cannot read ({exc})") from None


def chat_messages(record: Any) -> list[Any]:
    """The message list of one record: {"messages": [...], ...} or a bare list of messages."""
    messages = record.get("messages") if isinstance(record, dict) else record
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError('expected an object with a non-empty "messages" list')
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise ChatFormatError("chat has no assistant turn (nothing to learn from)")
    return messages


def encode_for_training(tokenizer: Tokenizer, messages: Sequence[Any]) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a whole conversation, mask = 1 on assistant replies and their end marker."""
    if tokenizer.info.chat_template != "jinja":
        encoded = encode_chat(tokenizer, messages, add_generation_prompt=False)
        return encoded.ids, encoded.loss_mask
    # Jinja: render up to each reply; the tokens a reply adds are the ones to learn.
    ids = encode_chat(tokenizer, messages, add_generation_prompt=False).ids
    mask = [0] * len(ids)
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = encode_chat(tokenizer, messages[:index], add_generation_prompt=True).ids if index else []
        through_reply = encode_chat(tokenizer, messages[: index + 1], add_generation_prompt=False).ids
        if ids[: len(through_reply)] != through_reply or through_reply[: len(prompt)] != prompt:
            raise ChatFormatError("the model's chat template does not render conversations prefix by prefix")
        mask[len(prompt) : len(through_reply)] = [1] * (len(through_reply) - len(prompt))
    return ids, mask


@dataclass
class ChatSet:
    """Encoded chats stored flat: chat i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32 [total tokens]
    loss_mask: np.ndarray  # uint8 [total tokens], 1 on assistant tokens
    offsets: np.ndarray  # int64 [num chats + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def chat(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.tokens[start:end], self.loss_mask[start:end]

    def head(self, max_tokens: int) -> "ChatSet":
        """The first chats, as many as fit in max_tokens (at least one)."""
        count = max(1, int(np.searchsorted(self.offsets, max_tokens, side="right")) - 1)
        end = int(self.offsets[count])
        return ChatSet(self.tokens[:end], self.loss_mask[:end], self.offsets[: count + 1])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_assistant_tokens(self) -> int:
        return int(self.loss_mask.sum())


def read_chats(paths: Sequence[str | Path], tokenizer: Tokenizer, max_len: int | None = None,
               long_chats: str = "truncate", strict: bool = False, limit: int | None = None) -> tuple[ChatSet, ChatReadReport]:
    """Read, validate and encode the chats of JSONL files (plain or gzip).

    max_len: longest chat in tokens; longer ones are truncated or dropped (`long_chats`).
    limit: stop after this many usable chats.
    """
    if long_chats not in ("truncate", "drop"):
        raise ChatDataError(f"--long-chats must be 'truncate' or 'drop', got {long_chats!r}")
    report = ChatReadReport()
    token_runs, mask_runs = [], []
    for path in paths:
        for location, record in iter_json_lines(Path(path), report, strict):
            if limit is not None and report.chats >= limit:
                break
            try:
                ids, mask = encode_for_training(tokenizer, chat_messages(record))
            except ChatFormatError as exc:
                report.note(location, str(exc), strict)
                continue
            if max_len is not None and len(ids) > max_len:
                if long_chats == "drop" or not any(mask[:max_len]):
                    report.dropped_long += 1
                    continue
                ids, mask = ids[:max_len], mask[:max_len]
                report.truncated += 1
            token_runs.append(np.asarray(ids, dtype=np.int32))
            mask_runs.append(np.asarray(mask, dtype=np.uint8))
            report.chats += 1
    if not token_runs:
        where = ", ".join(str(p) for p in paths)
        hint = f" (first problem: {report.problems[0]})" if report.problems else ""
        raise ChatDataError(f"{where}: no usable chats{hint}")
    offsets = np.zeros(len(token_runs) + 1, dtype=np.int64)
    np.cumsum([len(run) for run in token_runs], out=offsets[1:])
    return ChatSet(np.concatenate(token_runs), np.concatenate(mask_runs), offsets), report


def print_read_report(report: ChatReadReport, label: str, stream=sys.stderr) -> None:
    for problem in report.problems:
        print(f"warning: skipped {problem}", file=stream)
    if report.skipped > len(report.problems):
        print(f"warning: ... and {report.skipped - len(report.problems)} more bad records", file=stream)
    print(f"{label}: {report.summary()}", file=stream)


# --- packing ----------------------------------------------------------------------------


def pack_rows(lengths: np.ndarray, order: np.ndarray, row_len: int, open_rows: int = 16) -> list[list[int]]:
    """Group chats into rows of at most `row_len` tokens, best fit among a few open rows.

    Chats are taken in `order`; each goes to the open row it fills most tightly.
    When none has room, the fullest open row is closed (when `open_rows` are open)
    and a new row opened. Returns the chat indices of each row.
    """
    rows: list[list[int]] = []
    open_chats: list[list[int]] = []
    open_free: list[int] = []
    for chat in order.tolist():
        length = int(lengths[chat])
        best = -1
        for slot, free in enumerate(open_free):
            if length <= free and (best < 0 or free < open_free[best]):
                best = slot
        if best < 0:
            if len(open_free) >= open_rows:
                fullest = min(range(len(open_free)), key=open_free.__getitem__)
                rows.append(open_chats.pop(fullest))
                open_free.pop(fullest)
            open_chats.append([])
            open_free.append(row_len)
            best = len(open_free) - 1
        open_chats[best].append(chat)
        open_free[best] -= length
    return rows + open_chats


class PackedChatBatches:
    """The SFT `BatchSource`: shuffled chats packed into rows of seq_len + 1 tokens.

    inputs = row[:-1], targets = row[1:] with IGNORE_INDEX wherever the target
    token is not an assistant token (prompts, headers, padding).
    """

    def __init__(self, chats: ChatSet, seq_len: int, pad_id: int, seed: int = 0, shuffle: bool = True):
        self.chats, self.seq_len, self.pad_id = chats, seq_len, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.row_cursor = 0, 0
        self._rows: list[list[int]] | None = None
        if int(chats.lengths().max()) > seq_len + 1:
            raise ChatDataError(f"a chat has {int(chats.lengths().max())} tokens, more than --seq-len + 1 = {seq_len + 1}")

    def epoch_rows(self) -> list[list[int]]:
        """This epoch's rows (chat indices), recomputed from seed + epoch."""
        if self._rows is None:
            generator = np.random.default_rng(self.seed + self.epoch)
            order = generator.permutation(len(self.chats)) if self.shuffle else np.arange(len(self.chats))
            rows = pack_rows(self.chats.lengths(), order, self.seq_len + 1)
            if self.shuffle:  # the fullest rows are closed first; spread them out
                rows = [rows[i] for i in generator.permutation(len(rows))]
            self._rows = rows
        return self._rows

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs, targets: int64 [batch_size, seq_len]."""
        row_tokens = np.full((batch_size, self.seq_len + 1), self.pad_id, dtype=np.int64)
        row_mask = np.zeros((batch_size, self.seq_len + 1), dtype=bool)
        for row in range(batch_size):
            rows = self.epoch_rows()
            position = 0
            for chat in rows[self.row_cursor]:
                tokens, mask = self.chats.chat(chat)
                row_tokens[row, position : position + len(tokens)] = tokens
                row_mask[row, position : position + len(tokens)] = mask
                position += len(tokens)
            self._advance(len(rows))
        inputs = torch.from_numpy(row_tokens[:, :-1].copy())
        targets = torch.from_numpy(np.where(row_mask[:, 1:], row_tokens[:, 1:], IGNORE_INDEX))
        return inputs, targets

    def _advance(self, rows_in_epoch: int) -> None:
        self.row_cursor += 1
        if self.row_cursor >= rows_in_epoch:
            self.epoch, self.row_cursor, self._rows = self.epoch + 1, 0, None

    def rows_per_epoch(self) -> int:
        return len(self.epoch_rows())

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "row_cursor": self.row_cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch, self.row_cursor = int(state["seed"]), int(state["epoch"]), int(state["row_cursor"])
        self._rows = None


# --- model folders ------------------------------------------------------------------------


def check_output_folder(out: Path, overwrite: bool, base: Path | None = None) -> None:
    """Refuse an --out that would destroy something: the base, another model, or unrelated files."""
    from model.checkpoint import CONFIG_FILE
    from trainer.lora import ADAPTER_CONFIG

    out = Path(out)
    if base is not None and out.resolve() == Path(base).resolve():
        raise HearthError(f"--out {out} is the base model's folder; choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise HearthError(f"--out {out} is a file, not a folder")
    if not any(out.iterdir()):
        return
    if (out / CONFIG_FILE).is_file() or (out / ADAPTER_CONFIG).is_file():
        if not overwrite:
            raise HearthError(f"--out {out} already holds a model; pass --overwrite to replace it")
        return
    raise HearthError(f"--out {out} is not empty and holds no Hearth model; choose a new or empty folder")


def load_model(path: str | Path, base: str | Path | None = None, device: str = "cpu", force: bool = False):
    """A checkpoint, or an adapter attached to its base (as a `Checkpoint` of the base)."""
    from model.checkpoint import load_checkpoint
    from trainer.lora import attach_adapter, check_base, is_adapter_folder, read_adapter

    if not is_adapter_folder(path):
        return load_checkpoint(path, device=device)
    adapter = read_adapter(path)
    base_dir = Path(base or adapter.metadata.get("base", ""))
    if not base_dir.is_dir():
        raise HearthError(f"{path}: the adapter's base {base_dir} is not found; pass --base")
    checkpoint = load_checkpoint(base_dir, device=device)
    check_base(adapter, base_dir, checkpoint.metadata, force=force)
    attach_adapter(checkpoint.model, adapter)
    checkpoint.model.to(device).eval()
    return checkpoint


def merge_adapter_folder(base: Path, adapter_dir: Path, out: Path, overwrite: bool = False, force: bool = False) -> Path:
    """`hearth merge-lora`: base + adapter -> a normal checkpoint folder."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from trainer.lora import attach_adapter, check_base, merge_lora, read_adapter

    adapter = read_adapter(adapter_dir)
    check_output_folder(out, overwrite, base)
    checkpoint = load_checkpoint(base)
    check_base(adapter, base, checkpoint.metadata, force=force)
    merged = merge_lora(attach_adapter(checkpoint.model, adapter))
    training = dict(adapter.metadata.get("training") or {})
    training["merged"] = {"base": str(base.resolve()), "adapter": str(adapter_dir.resolve())}
    return save_checkpoint(out, merged, checkpoint.tokenizer, extra_metadata={"training": training})


# --- the SFT run --------------------------------------------------------------------------

DEFAULT_BATCH_TOKENS = 8192  # tokens per optimizer step (packed rows x seq_len)
DEFAULT_MICRO_TOKENS = 4096  # tokens per forward/backward: large enough for efficient CPU matmuls
DEFAULT_SEQ_LEN = 512  # packed row length when the model's context is longer


@dataclass
class SFTOptions:
    """Everything `hearth sft` takes (see trainer/sft_commands.py for the help texts)."""

    base: Path  # checkpoint folder to fine-tune
    data: list[str]  # chat JSONL files
    out: Path  # output folder: checkpoint, or adapter folder with LoRA (without --merge)
    val_data: list[str] | None = None  # chat JSONL files for validation loss
    lora_rank: int | None = None  # None: full fine-tuning
    lora_alpha: float | None = None  # None: 2 x rank
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    merge: bool = False  # LoRA: save base + adapter merged, as a normal checkpoint
    lr: float | None = None  # None: 1e-4 full, 1e-3 LoRA
    min_lr: float | None = None  # None: lr / 10
    weight_decay: float = 0.0
    epochs: float | None = None  # passes over the chats (default 1 when max_steps is None)
    max_steps: int | None = None  # optimizer steps, instead of epochs
    seq_len: int | None = None  # packed row length; None: min(model context, 512)
    batch_size: int | None = None  # rows per optimizer step; None: from batch_tokens
    batch_tokens: int | None = None  # tokens per optimizer step; None: DEFAULT_BATCH_TOKENS
    micro_batch_size: int | None = None  # rows per forward/backward; None: ~DEFAULT_MICRO_TOKENS tokens
    warmup: int | None = None  # warmup steps; None: 3% of the run
    eval_every: int = 0  # steps between validation passes (0: only at the end)
    eval_rows: int = 64  # packed validation rows scored per pass (fewer when the set is smaller)
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    long_chats: str = "truncate"  # chats longer than seq_len + 1: "truncate" or "drop"
    strict: bool = False  # stop at the first bad record
    device: str = "cpu"
    dtype: str = "bfloat16"  # compute dtype (autocast); master weights stay fp32
    seed: int = 0
    resume: bool = False  # continue the run saved in `out`
    overwrite: bool = False  # replace a model already in `out`
    progress: bool = True  # tqdm bar

    @classmethod
    def from_args(cls, args: Any) -> "SFTOptions":
        from trainer.lora import LoRAConfig

        values = {name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)}
        values["base"], values["out"] = Path(args.base), Path(args.out)
        values["lora_targets"] = LoRAConfig.parse_targets(args.lora_targets)
        values["progress"] = not getattr(args, "no_progress", False)
        return cls(**values)

    @property
    def use_lora(self) -> bool:
        return self.lora_rank is not None

    def validate(self) -> None:
        if self.epochs is not None and self.max_steps is not None:
            raise HearthError("give --epochs or --max-steps, not both")
        if self.merge and not self.use_lora:
            raise HearthError("--merge needs --lora-rank (full fine-tuning already saves a whole model)")
        for name in ("epochs", "max_steps", "seq_len", "batch_size", "batch_tokens", "micro_batch_size", "lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise HearthError(f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("warmup", "eval_every", "save_every", "weight_decay", "min_lr"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise HearthError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.dtype not in ("float32", "bfloat16"):
            raise HearthError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclass
class BatchPlan:
    """How the packed rows are cut into steps."""

    seq_len: int  # tokens per row (inputs)
    batch_size: int  # rows per optimizer step
    micro_batch_size: int  # rows per forward/backward
    max_steps: int  # optimizer steps of the run
    warmup_steps: int


def plan_batches(options: SFTOptions, rows_per_epoch: int, seq_len: int) -> BatchPlan:
    batch_size = options.batch_size or max(1, (options.batch_tokens or DEFAULT_BATCH_TOKENS) // seq_len)
    micro = options.micro_batch_size or max(1, min(batch_size, DEFAULT_MICRO_TOKENS // seq_len))
    while batch_size % micro:  # the largest micro batch that divides the step
        micro -= 1
    if options.micro_batch_size and micro != options.micro_batch_size:
        raise HearthError(f"--batch-size {batch_size} is not a multiple of --micro-batch-size {options.micro_batch_size}")
    max_steps = options.max_steps or max(1, math.ceil((options.epochs or 1.0) * rows_per_epoch / batch_size))
    warmup = options.warmup if options.warmup is not None else max(1, round(0.03 * max_steps))
    return BatchPlan(seq_len, batch_size, micro, max_steps, min(warmup, max_steps))


def run_sft(options: SFTOptions) -> int:
    """`hearth sft`: read chats, fine-tune (full or LoRA), save; returns the exit status."""
    from trainer.loop import TrainConfig, train

    options.validate()
    check_output_folder(options.out, options.overwrite or options.resume, options.base)
    base = load_base(options)
    seq_len = options.seq_len or min(base.config.max_seq_len, DEFAULT_SEQ_LEN)
    if seq_len > base.config.max_seq_len:
        raise HearthError(f"--seq-len {seq_len} is longer than the model's context ({base.config.max_seq_len})")
    train_data, val_data, facts = load_chat_sources(options, base.tokenizer, seq_len)
    plan = plan_batches(options, train_data.rows_per_epoch(), seq_len)
    model, trainable, save_fn, lora_facts = prepare_model(options, base)
    eval_batches = max(1, min(options.eval_rows, val_data.rows_per_epoch() if val_data else 1) // plan.micro_batch_size)
    config = TrainConfig(
        max_steps=plan.max_steps, batch_size=plan.batch_size, micro_batch_size=plan.micro_batch_size,
        lr=options.lr or (1e-3 if options.use_lora else 1e-4), min_lr=options.min_lr,
        warmup_steps=plan.warmup_steps, weight_decay=options.weight_decay, eval_every=options.eval_every,
        eval_batches=eval_batches, save_every=options.save_every, dtype=options.dtype, device=options.device,
        seed=options.seed, progress=options.progress,
    )
    run_info = {"task": "sft", "base": str(options.base.resolve()), "base_training": base.metadata.get("training"),
                "seq_len": seq_len, "packing": "chats packed whole into rows, causal attention across them",
                "loss": "assistant tokens only", **facts, "lora": lora_facts}
    result = train(model, train_data, val_data, config, options.out, base.tokenizer,
                   trainable_params=trainable, save_fn=save_fn, resume=options.resume, run_info=run_info)
    if options.merge and result.interrupted is None:
        merge_into_checkpoint(options, base, model, result, run_info)
    return 0


def load_base(options: SFTOptions):
    """The base checkpoint in fp32 (full fine-tuning trains those weights; LoRA keeps them frozen)."""
    from model.checkpoint import load_checkpoint

    base = load_checkpoint(options.base, dtype=torch.float32)
    if base.quantization:
        raise HearthError(f"{options.base}: base is quantized; fine-tune the unquantized checkpoint, then quantize")
    return base


def load_chat_sources(options: SFTOptions, tokenizer: Tokenizer, seq_len: int):
    """(train batches, validation batches or None, facts for config.json)."""
    chats, report = read_chats(options.data, tokenizer, seq_len + 1, options.long_chats, options.strict)
    print_read_report(report, "train data")
    train_data = PackedChatBatches(chats, seq_len, tokenizer.pad_id or 0, seed=options.seed)
    facts = {"data": [str(p) for p in options.data], "chats": len(chats), "chat_tokens": chats.num_tokens,
             "assistant_tokens": chats.num_assistant_tokens, "skipped_records": report.skipped,
             "truncated_chats": report.truncated, "dropped_long_chats": report.dropped_long}
    val_data = None
    if options.val_data:
        val_chats, val_report = read_chats(options.val_data, tokenizer, seq_len + 1, options.long_chats, options.strict)
        print_read_report(val_report, "validation data")
        val_data = PackedChatBatches(val_chats, seq_len, tokenizer.pad_id or 0, shuffle=False)
        facts["val_data"] = [str(p) for p in options.val_data]
    return train_data, val_data, facts


def prepare_model(options: SFTOptions, base):
    """(model, trainable parameter names or None, save_fn, LoRA facts or None), resumed weights loaded."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from trainer.lora import (LoRAConfig, apply_lora, is_adapter_folder, load_adapter_state, lora_modules,
                              read_adapter, save_adapter)

    card = model_card(options, base)
    if not options.use_lora:
        model = base.model
        if options.resume:
            if is_adapter_folder(options.out):
                raise HearthError(f"--resume: {options.out} holds a LoRA adapter; pass the same --lora-rank to resume it")
            model = load_checkpoint(options.out, dtype=torch.float32).model

        def save_full(folder: Path, extra_files: dict, info: dict) -> None:
            save_checkpoint(folder, model, base.tokenizer, extra_metadata={"training": info},
                            extra_files=extra_files, model_card=card)

        return model, None, save_full, None
    lora = LoRAConfig(options.lora_rank, options.lora_alpha or 2.0 * options.lora_rank,
                      options.lora_dropout, options.lora_targets)
    model = base.model
    apply_lora(model, lora, seed=options.seed)
    if options.resume:
        if not is_adapter_folder(options.out):
            raise HearthError(f"--resume: {options.out} holds no LoRA adapter (was the run full fine-tuning?)")
        adapter = read_adapter(options.out)
        load_adapter_state(model, adapter.state, str(options.out))
    trainable = [f"{name}.{part}" for name in lora_modules(model) for part in ("lora_a", "lora_b")]

    def save_lora(folder: Path, extra_files: dict, info: dict) -> None:
        save_adapter(folder, model, lora, options.base, base.metadata, training=info, extra_files=extra_files)

    facts = {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
             "trainable_params": sum(model.get_parameter(name).numel() for name in trainable)}
    return model, trainable, save_lora, facts


def model_card(options: SFTOptions, base) -> str | None:
    """The base's card (licence notices included) plus a note on this fine-tuning run."""
    from model.checkpoint import CARD_FILE

    card_file = options.base / CARD_FILE
    base_card = card_file.read_text(encoding="utf-8") if card_file.is_file() else ""
    note = (f"\n\n## Fine-tuning\n\nSupervised fine-tuning of `{options.base}` on "
            f"{', '.join(f'`{p}`' for p in options.data)} (loss on assistant tokens only). "
            "See `training` in config.json for the settings.\n")
    return (base_card.rstrip() + note) if base_card else note.lstrip()


def merge_into_checkpoint(options: SFTOptions, base, model, result, run_info: dict[str, Any]) -> None:
    """--merge: replace the adapter folder in --out by base + adapter as a normal checkpoint."""
    from model.checkpoint import DTYPES, save_checkpoint
    from trainer.loop import LOSS_CURVE, METRICS_FILE
    from trainer.lora import merge_lora

    merge_lora(model)
    base_dtype = DTYPES.get(base.metadata.get("dtype", "float32"), torch.float32)
    model.to(base_dtype)
    training = {**run_info, "steps": result.steps, "tokens_seen": result.tokens_seen,
                "train_loss": result.train_loss, "val_loss": result.val_loss, "merged": True}
    kept = {name: (options.out / name).read_bytes() for name in (METRICS_FILE, LOSS_CURVE)
            if (options.out / name).is_file()}
    extra_files = {name: (lambda path, data=data: path.write_bytes(data)) for name, data in kept.items()}
    save_checkpoint(options.out, model, base.tokenizer, extra_metadata={"training": training},
                    extra_files=extra_files, model_card=model_card(options, base))
    print(f"merged the adapter into {options.out}", file=sys.stderr)
