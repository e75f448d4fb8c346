"""`hearth sft` and `hearth merge-lora`: supervised fine-tuning, full or LoRA, on chats.

Design choices:
- The run is the shared trainer loop (`trainer/loop.py`) fed by
  `PackedChatBatches` (`trainer/chat_data.py`: chat template, assistant-only
  loss mask, packing). SFT adds only what is its own: the base checkpoint,
  LoRA wrapping, what a checkpoint of the run is, and the output rules.
- Full fine-tuning writes a normal checkpoint folder; LoRA writes an adapter
  folder (adapter.safetensors + adapter_config.json) unless `--merge`, which
  folds the adapter into the base at the end. Either way the training state
  sits beside it, so `--resume` continues exactly, and config.json (or
  adapter_config.json) gets a "training" entry describing the run, with the
  base's own "training" entry nested in it.
- `--out` is never allowed to destroy something: the base folder, another
  model (without `--overwrite`), or a folder of unrelated files are refused
  before any work starts; writes are atomic (temp folder, then rename).
- Defaults are sized for CPU: 8192-token steps in 4096-token micro-batches,
  rows of min(context, 512) tokens, bf16 autocast over fp32 master weights.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.errors import HearthError
from model.tokenizer import Tokenizer
from trainer.chat_data import ChatSet, PackedChatBatches, print_read_report, read_chats


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
    card = model_card(base, training.get("data", []))
    return save_checkpoint(out, merged, checkpoint.tokenizer, extra_metadata={"training": training}, model_card=card)


# --- the SFT run --------------------------------------------------------------------------

DEFAULT_BATCH_TOKENS = 8192  # tokens per optimizer step (packed rows x seq_len)
DEFAULT_MICRO_TOKENS = 4096  # tokens per forward/backward: large enough for efficient CPU matmuls
DEFAULT_SEQ_LEN = 512  # packed row length when the model's context is longer
DEFAULT_FULL_LR, DEFAULT_LORA_LR = 1e-4, 1e-3  # peak learning rates


@dataclass
class SFTOptions:
    """Everything `hearth sft` takes (see trainer/sft_commands.py for the help texts)."""

    base: Path  # checkpoint folder to fine-tune
    data: list[str]  # chat JSONL files
    out: Path  # output folder: checkpoint, or adapter folder with LoRA (without --merge)
    val_data: list[str] | None = None  # chat JSONL files for validation loss
    upsample: list[str] | None = None  # "FILE:N": FILE's chats also trained on, N times per epoch (rare kinds)
    text_data: list[str] | None = None  # plain text trained on too, loss on every token (continued pretraining)
    lora_rank: int | None = None  # None: full fine-tuning
    lora_alpha: float | None = None  # None: 2 x rank
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    merge: bool = False  # LoRA: save base + adapter merged, as a normal checkpoint
    lr: float | None = None  # None: 1e-4 full, 1e-3 LoRA
    min_lr: float | None = None  # None: lr / 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm (0: off)
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
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N, mps
    dtype: str | None = None  # compute dtype (autocast) over fp32 master weights; None: bf16 where fast
    compile: bool = False  # torch.compile the model
    log_file: str | None = None  # live JSONL copy of the metrics
    seed: int = 0
    stop_at: int | None = None  # end this invocation (with a checkpoint) at this step; schedule unchanged
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
        if self.dtype not in (None, "float32", "bfloat16"):
            raise HearthError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        self.upsampled()

    def upsampled(self) -> list[tuple[str, int]]:
        """--upsample FILE:N entries as (FILE, N)."""
        pairs = []
        for spec in self.upsample or ():
            file, _, times = spec.rpartition(":")
            if not file or not times.isdigit() or int(times) < 1:
                raise HearthError(f"--upsample {spec!r}: expected FILE:N with N a positive integer (e.g. greetings.jsonl:50)")
            pairs.append((file, int(times)))
        return pairs


@dataclass
class BatchPlan:
    """How the packed rows are cut into steps."""

    seq_len: int  # tokens per row (inputs)
    batch_size: int  # rows per optimizer step
    micro_batch_size: int  # rows per forward/backward
    max_steps: int  # optimizer steps of the run
    warmup_steps: int


def plan_batches(options: SFTOptions, rows_per_epoch: int, seq_len: int, world_size: int = 1) -> BatchPlan:
    batch_size = options.batch_size or max(world_size, (options.batch_tokens or DEFAULT_BATCH_TOKENS) // seq_len)
    batch_size = -(-batch_size // world_size) * world_size  # every rank gets the same number of rows
    per_rank = batch_size // world_size
    micro = options.micro_batch_size or max(1, min(per_rank, DEFAULT_MICRO_TOKENS // seq_len))
    while per_rank % micro:  # the largest micro batch that divides a rank's share of the step
        micro -= 1
    if options.micro_batch_size and micro != options.micro_batch_size:
        raise HearthError(f"--batch-size {batch_size} is not a multiple of --micro-batch-size "
                          f"{options.micro_batch_size} x {world_size} rank(s)")
    max_steps = options.max_steps or max(1, math.ceil((options.epochs or 1.0) * rows_per_epoch / batch_size))
    warmup = options.warmup if options.warmup is not None else max(1, round(0.03 * max_steps))
    return BatchPlan(seq_len, batch_size, micro, max_steps, min(warmup, max_steps))


def run_sft(options: SFTOptions) -> int:
    """`hearth sft`: read chats, fine-tune (full or LoRA), save; returns the exit status."""
    from trainer.distributed import barrier, init_distributed, shutdown_distributed
    from trainer.pretrain import default_dtype, pick_device

    options.validate()
    options.device = pick_device(options.device)
    options.dtype = options.dtype or default_dtype(options.device)
    check_output_folder(options.out, options.overwrite or options.resume, options.base)
    context, options.device = init_distributed(options.device)
    try:
        result = fine_tune(options, context)
        barrier(context)  # all ranks done before the group goes: gloo aborts a rank whose peer tears it down early
    finally:
        shutdown_distributed()
    if result.interrupted:
        if context.is_main:
            print(f"interrupted ({result.interrupted}): checkpoint at step {result.steps} in {options.out}; "
                  "continue with the same command plus --resume", file=sys.stderr)
        return 130 if result.interrupted == "SIGINT" else 143
    return 0


def fine_tune(options: SFTOptions, context):
    """The run itself, on this rank: base, data, model, the shared loop, then --merge."""
    from trainer.loop import train

    base = load_base(options)
    seq_len = options.seq_len or min(base.config.max_seq_len, DEFAULT_SEQ_LEN)
    if seq_len > base.config.max_seq_len:
        raise HearthError(f"--seq-len {seq_len} is longer than the model's context ({base.config.max_seq_len})")
    train_data, val_data, facts = load_chat_sources(options, base.tokenizer, seq_len, verbose=context.is_main)
    plan = plan_batches(options, train_data.rows_per_epoch(), seq_len, context.world_size)
    model, trainable, save_fn, lora_facts = prepare_model(options, base)
    config = train_config(options, plan, val_data)
    run_info = {"task": "sft", "base": str(options.base.resolve()), "base_training": base.metadata.get("training"),
                "seq_len": seq_len, "packing": "chats packed whole into rows, causal attention across them",
                "loss": "assistant tokens only", **facts, "lora": lora_facts,
                "batch_size": plan.batch_size, "max_steps": plan.max_steps}
    if options.resume:
        check_resumable(options.out, run_info)
    result = train(model, train_data, val_data, config, options.out, base.tokenizer, trainable_params=trainable,
                   save_fn=save_fn, resume=options.resume, run_info=run_info, context=context)
    if options.merge and result.interrupted is None and context.is_main:
        merge_into_checkpoint(options, base, model, result, run_info)
    return result


def train_config(options: SFTOptions, plan: "BatchPlan", val_data: PackedChatBatches | None):
    from trainer.loop import TrainConfig

    val_rows = min(options.eval_rows, val_data.rows_per_epoch()) if val_data else 1
    return TrainConfig(
        max_steps=plan.max_steps, batch_size=plan.batch_size, micro_batch_size=plan.micro_batch_size,
        lr=options.lr or (DEFAULT_LORA_LR if options.use_lora else DEFAULT_FULL_LR), min_lr=options.min_lr,
        warmup_steps=plan.warmup_steps, weight_decay=options.weight_decay, grad_clip=options.grad_clip,
        eval_every=options.eval_every, eval_batches=max(1, val_rows // plan.micro_batch_size),
        save_every=options.save_every, dtype=options.dtype, device=options.device, compile=options.compile,
        seed=options.seed, progress=options.progress, log_file=options.log_file, stop_at=options.stop_at,
    )


# What must match between a run and the one it resumes (the loop notes changed step settings itself).
RESUME_KEYS = ("base", "data", "seq_len", "lora", "chats")


def check_resumable(out: Path, run_info: dict[str, Any]) -> None:
    """Refuse --resume when the saved run differs in data, shapes or plan."""
    import json

    from model.checkpoint import CONFIG_FILE
    from model.errors import CheckpointError
    from trainer.lora import ADAPTER_CONFIG

    record = out / (ADAPTER_CONFIG if (out / ADAPTER_CONFIG).is_file() else CONFIG_FILE)
    saved = json.loads(record.read_text(encoding="utf-8")).get("training") or {}
    if saved.get("task") != "sft":
        raise CheckpointError(f"{record}: not an SFT run; nothing to --resume")
    for key in RESUME_KEYS:
        if key in saved and saved[key] != run_info.get(key):
            raise CheckpointError(f"cannot resume: {out} was trained with {key} = {json.dumps(saved[key])}, "
                                  f"this run gives {json.dumps(run_info.get(key))}")


def load_base(options: SFTOptions):
    """The base checkpoint in fp32 (full fine-tuning trains those weights; LoRA keeps them frozen)."""
    from model.checkpoint import load_checkpoint

    base = load_checkpoint(options.base, dtype=torch.float32)
    if base.quantization:
        raise HearthError(f"{options.base}: base is quantized; fine-tune the unquantized checkpoint, then quantize")
    return base


def load_chat_sources(options: SFTOptions, tokenizer: Tokenizer, seq_len: int, verbose: bool = True):
    """(train batches, validation batches or None, facts for config.json)."""
    chats, report = read_chats(options.data, tokenizer, seq_len + 1, options.long_chats, options.strict)
    if verbose:
        print_read_report(report, "train data")
    parts = [chats]
    for file, times in options.upsampled():  # read on their own: de-duplication against --data would drop them
        extra, extra_report = read_chats([file], tokenizer, seq_len + 1, options.long_chats, options.strict)
        parts += [extra] * times
        if verbose:
            print_read_report(extra_report, f"upsampled x{times} ({file})")
    if options.text_data:
        texts, text_report = read_chats(options.text_data, tokenizer, seq_len + 1, "truncate", options.strict,
                                        texts=True)
        parts.append(texts)
        if verbose:
            print_read_report(text_report, "text data")
    chats = ChatSet.concatenate(parts) if len(parts) > 1 else chats
    train_data = PackedChatBatches(chats, seq_len, tokenizer.pad_id or 0, seed=options.seed)
    facts = {"data": [str(p) for p in options.data], "upsample": list(options.upsample or []),
             "text_data": list(options.text_data or []),
             "chats": len(chats), "chat_tokens": chats.num_tokens,
             "assistant_tokens": chats.num_assistant_tokens, "skipped_records": report.skipped,
             "truncated_chats": report.truncated, "dropped_long_chats": report.dropped_long}
    val_data = None
    if options.val_data:
        val_chats, val_report = read_chats(options.val_data, tokenizer, seq_len + 1, options.long_chats, options.strict)
        if verbose:
            print_read_report(val_report, "validation data")
        val_data = PackedChatBatches(val_chats, seq_len, tokenizer.pad_id or 0, shuffle=False)
        facts["val_data"] = [str(p) for p in options.val_data]
    return train_data, val_data, facts


def prepare_model(options: SFTOptions, base):
    """(model, trainable parameter names or None, save_fn, LoRA facts or None), resumed weights loaded."""
    return prepare_lora_model(options, base) if options.use_lora else prepare_full_model(options, base)


def prepare_full_model(options: SFTOptions, base):
    from model.checkpoint import load_checkpoint, save_checkpoint
    from trainer.lora import is_adapter_folder

    source = base.model
    if options.resume:
        if is_adapter_folder(options.out):
            raise HearthError(f"--resume: {options.out} holds a LoRA adapter; pass the same --lora-rank to resume it")
        source = load_checkpoint(options.out, dtype=torch.float32).model
    model = fused_training_model(source)
    card = model_card(options.base, options.data)

    def save_full(folder: Path, extra_files: dict, info: dict) -> None:
        save_checkpoint(folder, model, base.tokenizer, extra_metadata={"training": info},
                        extra_files=extra_files, model_card=card)

    return model, None, save_full, None


def fused_training_model(source):
    """The same weights (shared, not copied) in the trainer's fused-forward decoder (~15% faster on CPU).

    Full fine-tuning only: the fused forward reads q/k/v and gate/up weights
    directly, which would bypass LoRA's wrapped layers.
    """
    from model.decoder import rope_inverse_frequencies
    from trainer.fast_model import TrainingTransformer

    with torch.device("meta"):
        model = TrainingTransformer(source.config)
    model.load_state_dict(source.state_dict(), assign=True)
    if source.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inverse_frequencies(source.config)
    return model


def prepare_lora_model(options: SFTOptions, base):
    from trainer.lora import (LoRAConfig, apply_lora, is_adapter_folder, load_adapter_state, lora_modules,
                              read_adapter, save_adapter)

    lora = LoRAConfig(options.lora_rank, options.lora_alpha or 2.0 * options.lora_rank,
                      options.lora_dropout, options.lora_targets)
    model = base.model
    apply_lora(model, lora, seed=options.seed)
    if options.resume:
        if not is_adapter_folder(options.out):
            raise HearthError(f"--resume: {options.out} holds no LoRA adapter (was the run full fine-tuning?)")
        load_adapter_state(model, read_adapter(options.out).state, str(options.out))
    trainable = [f"{name}.{part}" for name in lora_modules(model) for part in ("lora_a", "lora_b")]

    def save_lora(folder: Path, extra_files: dict, info: dict) -> None:
        save_adapter(folder, model, lora, options.base, base.metadata, training=info, extra_files=extra_files)

    facts = {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
             "trainable_params": sum(model.get_parameter(name).numel() for name in trainable)}
    return model, trainable, save_lora, facts


def model_card(base_dir: Path, data: list[str]) -> str:
    """The base's card (licence notices included) plus a note on this fine-tuning run."""
    from model.checkpoint import CARD_FILE

    card_file = Path(base_dir) / CARD_FILE
    base_card = card_file.read_text(encoding="utf-8") if card_file.is_file() else ""
    note = (f"\n\n## Fine-tuning\n\nSupervised fine-tuning of `{base_dir}` on "
            f"{', '.join(f'`{p}`' for p in data)} (loss on assistant tokens only). "
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
                    extra_files=extra_files, model_card=model_card(options.base, options.data))
    print(f"merged the adapter into {options.out}", file=sys.stderr)
