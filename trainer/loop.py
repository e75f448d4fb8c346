"""The generic training loop shared by pretraining and SFT/LoRA.

    train(model, train_data, val_data, config, out_dir, tokenizer) -> TrainResult

Design choices:
- Data comes from a `BatchSource`: `next_batch(n)` returns `n` rows of
  (inputs, targets) with -100 marking targets that carry no loss (SFT masks
  prompts this way). Rows form one stream: next_batch(a) then next_batch(b)
  yields the same rows as next_batch(a + b). That is what makes gradient
  accumulation and data parallelism exact: a step is always the same set of
  rows, however it is cut into micro-batches and ranks.
- The loss of a step is the sum of per-token losses divided by the number of
  loss tokens in the whole global batch (not a mean of micro-batch means), so
  a masked batch weighs every target token equally.
- Weights stay fp32 (the master copy AdamW updates); the forward/backward run
  under bf16 autocast when asked, which is 4x faster than fp32 on CPUs with
  AVX-512 BF16 and the norm on GPUs.
- A checkpoint is the caller's folder format (`save_fn`; the default is a full
  Hearth checkpoint) plus `training_state.safetensors` (optimizer moments by
  parameter name, RNG states as uint8 tensors), `training_state.json` (step,
  data position, config) and `metrics.jsonl`, all written into the folder
  before it is atomically swapped in. No pickles.
- On resume the caller restores the weights (it knows its own format, e.g.
  LoRA adapters); the loop restores optimizer, schedule position, data
  position, RNG and metrics, so N + resume + N steps equals 2N steps.
- SIGINT/SIGTERM set a flag; the loop finishes the current optimizer step,
  saves, and returns `interrupted`. A second Ctrl-C stops at once (the last
  checkpoint is intact: saves are atomic).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from model.errors import CheckpointError, HearthError
from trainer.distributed import DistributedContext, all_reduce_sum, barrier, gradient_sync, wrap_model
from trainer.metrics import MetricsLog, peak_flops, plot_loss_curve
from trainer.optim import Schedule, build_optimizer, set_lr

IGNORE_INDEX = -100
STATE_TENSORS, STATE_JSON, METRICS_FILE, LOSS_CURVE = (
    "training_state.safetensors", "training_state.json", "metrics.jsonl", "loss_curve.png")
STATE_FORMAT = "hearth-training-state"


class TrainingError(HearthError):
    """A training setup that cannot run (batch shape, resume mismatch...)."""


class BatchSource(Protocol):
    def next_batch(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """(inputs [B, T] int64, targets [B, T] int64 with -100 = no loss)."""
        ...

    def state_dict(self) -> dict:
        """JSON-safe position in the stream, for exact resume."""
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


@dataclass
class TrainConfig:
    max_steps: int  # optimizer steps of the whole run (resumed runs included)
    batch_size: int = 8  # sequences per optimizer step, all ranks together
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    lr: float = 3e-4  # peak learning rate
    min_lr: float | None = None  # cosine floor at max_steps; None: lr / 10
    warmup_steps: int = 0  # linear warmup steps
    weight_decay: float = 0.1  # on matrices only
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 0  # steps between validation passes; 0: only at the end
    eval_batches: int = 8  # micro-batches per validation pass
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    log_every: int = 10  # steps between metric records
    dtype: str = "bfloat16"  # compute dtype under autocast: "bfloat16" or "float32"
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", "mps"
    compile: bool = False  # torch.compile the model
    seed: int = 0  # torch RNG seed
    progress: bool = True  # tqdm progress bar on rank 0
    log_file: str | None = None  # live JSONL copy of the metrics, appended as the run goes
    peak_flops: float | None = None  # device peak FLOP/s for MFU; None: look up / measure
    stop_at: int | None = None  # end this invocation (with a checkpoint) at this step; schedule unchanged

    @property
    def floor_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def grad_accum_steps(self, world_size: int) -> int:
        rows_per_micro_step = self.micro_batch_size * world_size
        if self.batch_size % rows_per_micro_step:
            raise TrainingError(
                f"batch of {self.batch_size} sequences per step is not a multiple of micro batch "
                f"{self.micro_batch_size} x {world_size} rank(s)")
        return self.batch_size // rows_per_micro_step

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed (resumed runs included)
    tokens_seen: int  # input tokens processed (resumed runs included)
    train_loss: float | None  # mean loss of the last step
    val_loss: float | None  # last validation loss, when there is validation data
    out_dir: Path  # the checkpoint folder
    interrupted: str | None = None  # signal name when stopped by SIGINT/SIGTERM
    tokens_per_s: float | None = None  # average training throughput of this invocation


SaveFn = Callable[[Path, dict[str, Callable[[Path], None]], dict[str, Any]], None]


@dataclass
class _RunState:
    step: int = 0
    tokens_seen: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    train_seconds: float = 0.0  # time spent in optimizer steps during this invocation
    tokens_this_run: int = 0
    seq_len: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def autocast_context(device: str, dtype: str):
    """bf16 autocast where asked (CPU and CUDA support it); fp32 runs plain."""
    if dtype == "float32":
        return nullcontext()
    if dtype != "bfloat16":
        raise TrainingError(f"--dtype {dtype}: training supports float32 or bfloat16 (fp16 is slow on CPU)")
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def is_sharded(model: nn.Module) -> bool:
    """FSDP2 gathers the root's weights in a forward hook, so only `model(...)` may run it."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def token_loss_sum(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Sum of next-token cross-entropy over the targets that are not -100.

    A model with `loss_hidden_states` (Hearth's decoder itself, not a DDP or
    FSDP wrapper, whose forward must run for gradient sync) gets its LM head
    applied only at the positions that carry loss: SFT masks the system and
    user turns, and for a large vocabulary the head is the biggest matmul.
    """
    hidden_states = getattr(model, "loss_hidden_states", None)
    if hidden_states is None or is_sharded(model):
        logits = model(inputs)  # [B, T, vocab]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden_states(inputs)[keep])  # [loss tokens, vocab]
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: BatchSource, num_batches: int, batch_size: int, device: str,
                  dtype: str = "bfloat16", context: DistributedContext | None = None) -> float:
    """Mean per-token loss over `num_batches` x `batch_size` rows of `data`.

    Under data parallelism the same rows are shared out over the ranks (each
    scores batch_size rows per pass), so the result equals a single process's.
    """
    context = context or DistributedContext()
    was_training = model.training
    model.eval()
    loss_sum, num_tokens = 0.0, 0
    for _ in range(math.ceil(num_batches / context.world_size)):
        inputs, targets = data.next_batch(batch_size * context.world_size)
        num_tokens += int((targets != IGNORE_INDEX).sum())
        rows = slice(context.rank * batch_size, (context.rank + 1) * batch_size)
        with autocast_context(device, dtype):
            loss_sum += float(token_loss_sum(model, inputs[rows].to(device), targets[rows].to(device)))
    model.train(was_training)
    if hasattr(model, "reshard"):  # FSDP2 keeps the root unsharded after a forward with no backward
        model.reshard()
    (loss_sum,) = all_reduce_sum([loss_sum], context, device)
    return loss_sum / max(num_tokens, 1)


class StopSignals:
    """SIGINT/SIGTERM -> a flag checked between steps; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _resolve_trainable(model: nn.Module, trainable: Iterable[Any] | None) -> list[tuple[str, nn.Parameter]]:
    """Trainable (name, param) pairs; freezes everything else when names are given."""
    named = list(model.named_parameters())
    if trainable is None:
        return [(n, p) for n, p in named if p.requires_grad]
    names = {item if isinstance(item, str) else item[0] for item in trainable}
    unknown = names - {n for n, _ in named}
    if unknown:
        raise TrainingError(f"trainable parameter(s) not in the model: {', '.join(sorted(unknown)[:3])}")
    for name, param in named:
        param.requires_grad_(name in names)
    return [(n, p) for n, p in named if n in names]


def train(
    model: nn.Module,
    train_data: BatchSource,
    val_data: BatchSource | None,
    config: TrainConfig,
    out_dir: str | Path,
    tokenizer: Any,
    *,
    trainable_params: Iterable[Any] | None = None,
    save_fn: SaveFn | None = None,
    resume: bool = False,
    run_info: dict[str, Any] | None = None,
    context: DistributedContext | None = None,
) -> TrainResult:
    """Train `model` in place for `config.max_steps` optimizer steps; checkpoints into `out_dir`.

    trainable_params: parameter names (or (name, param) pairs) to train, the rest
      frozen; default: every parameter with requires_grad.
    save_fn(folder, extra_files, training_info): writes the checkpoint folder
      atomically including `extra_files` (name -> writer(path)); default: a full
      Hearth checkpoint with training_info under config.json's "training".
    resume: continue from the training state in `out_dir` (weights already loaded
      by the caller).
    run_info: JSON-safe facts merged into the "training" entry (preset, data...).
    """
    runner = _Runner(model, train_data, val_data, config, Path(out_dir), tokenizer,
                     trainable_params, save_fn, run_info or {}, context or DistributedContext())
    return runner.run(resume)


class _Runner:
    """One training invocation: setup, the step loop, evaluation, checkpoints."""

    def __init__(self, model, train_data, val_data, config, out_dir, tokenizer, trainable, save_fn, run_info, context):
        self.model, self.train_data, self.val_data = model, train_data, val_data
        self.config, self.out_dir, self.tokenizer = config, out_dir, tokenizer
        self.save_fn, self.run_info, self.context = save_fn, run_info, context
        self.device = config.device
        self.accum_steps = config.grad_accum_steps(context.world_size)
        torch.manual_seed(config.seed)
        model.to(self.device).train()
        if config.compile:
            model.compile()
        self.wrapped = wrap_model(model, context, self.device)
        self.trainable = _resolve_trainable(model, trainable)
        self.optimizer = build_optimizer(self.trainable, config.lr, config.weight_decay, config.betas,
                                         device_type=torch.device(self.device).type)
        self.schedule = Schedule(config.lr, config.floor_lr, config.warmup_steps, config.max_steps)
        self.state = _RunState()
        self.metrics = MetricsLog(live_file=_open_log_file(config.log_file) if context.is_main else None)
        self.val_start = val_data.state_dict() if val_data is not None else None
        self.flops_per_token: float | None = None
        self.peak: float | None = None
        self.last_eval_step: int | None = None

    def log(self, message: str) -> None:
        if self.context.is_main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    # -- main loop -----------------------------------------------------------------

    def run(self, resume: bool) -> TrainResult:
        if resume:
            self._restore(read_training_state(self.out_dir))
        self._announce()
        with StopSignals() as stop, self._progress_bar() as bar:
            while self.state.step < min(self.config.max_steps, self.config.stop_at or self.config.max_steps):
                if self._stop_requested(stop):
                    break
                self._train_step()
                bar.update(1)
                bar.set_postfix_str(self._postfix(), refresh=False)
                self._periodic_work()
        interrupted = stop.received
        if interrupted:
            self.log(f"{interrupted}: saving a checkpoint at step {self.state.step}")
        elif (self.val_data is not None and self.state.step >= self.config.max_steps
              and self.last_eval_step != self.state.step):
            self._evaluate()  # at the real end only; a --stop-at pause leaves the metrics as a straight run's
        self._save(final=True)
        self._report_end(interrupted)
        return TrainResult(self.state.step, self.state.tokens_seen, self.state.train_loss, self.state.val_loss,
                           self.out_dir, interrupted, self._tokens_per_s())

    def _stop_requested(self, stop: StopSignals) -> bool:
        # Every rank must agree on when to stop, or the others hang in a collective.
        (flag,) = all_reduce_sum([1.0 if stop.received else 0.0], self.context, self.device)
        if flag and stop.received is None:
            stop.received = "SIGTERM"
        return flag > 0

    def _periodic_work(self) -> None:
        step, config = self.state.step, self.config
        if step % config.log_every == 0 or step == 1:
            self._record_train_metrics()
        if step >= config.max_steps:
            return
        if config.eval_every and step % config.eval_every == 0 and self.val_data is not None:
            self._evaluate()
        if config.save_every and step % config.save_every == 0:
            self._save(final=False)

    def _train_step(self) -> None:
        config, context = self.config, self.context
        set_lr(self.optimizer, self.schedule.lr_at(self.state.step))
        started = time.perf_counter()
        batches = [self.train_data.next_batch(config.micro_batch_size * context.world_size)
                   for _ in range(self.accum_steps)]
        num_loss_tokens = sum(int((targets != IGNORE_INDEX).sum()) for _, targets in batches)
        # DDP averages gradients over ranks; scaling by world_size makes that a sum.
        scale = context.world_size / max(num_loss_tokens, 1)
        rows = slice(context.rank * config.micro_batch_size, (context.rank + 1) * config.micro_batch_size)
        loss_sum = torch.zeros((), device=self.device)
        for index, (inputs, targets) in enumerate(batches):
            last = index == len(batches) - 1
            with gradient_sync(self.wrapped, context, sync=last):
                with autocast_context(self.device, config.dtype):
                    loss = token_loss_sum(self.wrapped, inputs[rows].to(self.device), targets[rows].to(self.device))
                (loss * scale).backward()
            loss_sum += loss.detach()
        self._clip_and_step()
        (total_loss,) = all_reduce_sum([float(loss_sum)], context, self.device)
        self.state.seq_len = batches[0][0].shape[1]
        tokens = sum(inputs.numel() for inputs, _ in batches)
        self.state.step += 1
        self.state.tokens_seen += tokens
        self.state.tokens_this_run += tokens
        self.state.train_loss = total_loss / max(num_loss_tokens, 1)
        self.state.train_seconds += time.perf_counter() - started
        if not math.isfinite(self.state.train_loss):
            raise TrainingError(f"loss became {self.state.train_loss} at step {self.state.step}; lower --lr")

    def _clip_and_step(self) -> None:
        params = [p for _, p in self.trainable]
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            self.state.extra["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- evaluation and feedback -------------------------------------------------

    def _evaluate(self) -> None:
        self.val_data.load_state_dict(self.val_start)  # the same validation rows every time
        loss = evaluate_loss(self.wrapped, self.val_data, self.config.eval_batches, self.config.micro_batch_size,
                             self.device, self.config.dtype, self.context)
        self.state.val_loss = loss
        self.last_eval_step = self.state.step
        self.metrics.add({"step": self.state.step, "tokens": self.state.tokens_seen, "val_loss": round(loss, 5),
                          "val_ppl": round(math.exp(min(loss, 50.0)), 3)})
        self.log(f"step {self.state.step}: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 50.0)):.2f}")

    def _record_train_metrics(self) -> None:
        record = {"step": self.state.step, "tokens": self.state.tokens_seen,
                  "loss": round(self.state.train_loss, 5),
                  "lr": float(f"{self.schedule.lr_at(self.state.step - 1):.4g}"),
                  "tokens_per_s": round(self._tokens_per_s() or 0.0, 1),
                  "train_seconds": round(self.state.train_seconds, 3)}  # this invocation's time in steps
        if "grad_norm" in self.state.extra:
            record["grad_norm"] = round(self.state.extra["grad_norm"], 4)
        mfu = self._mfu()
        if mfu is not None:
            record["mfu"] = round(mfu, 4)
        self.metrics.add(record)

    def _tokens_per_s(self) -> float | None:
        if self.state.train_seconds <= 0:
            return None
        return self.state.tokens_this_run / self.state.train_seconds

    def _mfu(self) -> float | None:
        if self.flops_per_token is None and self.state.seq_len and hasattr(self.model, "config"):
            self.flops_per_token = self._model_flops_per_token(self.state.seq_len)
        if not self.flops_per_token or not self.peak or not self._tokens_per_s():
            return None
        return self._tokens_per_s() * self.flops_per_token / (self.peak * self.context.world_size)

    def _model_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs a token costs, counting weight gradients only for the weights that train: a
        LoRA run's frozen base does not compute its own (what keeps its MFU below 100%)."""
        config = self.model.config
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for _, p in self.trainable)
        adapter = max(0, total - config.num_params(include_embeddings=True))
        return float(config.flops_per_token(seq_len, adapter_params=adapter, trainable_params=trainable))

    def _postfix(self) -> str:
        parts = [f"loss={self.state.train_loss:.4f}", f"lr={self.schedule.lr_at(self.state.step - 1):.2e}"]
        rate = self._tokens_per_s()
        if rate:
            parts.append(f"tok/s={rate:,.0f}")
        mfu = self._mfu()
        if mfu is not None:
            parts.append(f"mfu={mfu:.1%}")
        return " ".join(parts)

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(total=self.config.max_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                    disable=not (self.config.progress and self.context.is_main), file=sys.stderr)

    def _announce(self) -> None:
        config = self.config
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for _, p in self.trainable)
        dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
        self.peak = config.peak_flops or (peak_flops(self.device, dtype) if self.context.is_main else None)
        flops = ""
        if hasattr(self.model, "config") and hasattr(self.model.config, "flops_per_token"):
            seq_len = self.run_info.get("seq_len") or self.model.config.max_seq_len
            self.flops_per_token = self._model_flops_per_token(seq_len)
            flops = f", {self.flops_per_token / 1e6:.1f} MFLOPs/token (training)"
        self.log(f"model: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable){flops}")
        peak = f"; device peak {self.peak / 1e9:.0f} GFLOP/s ({config.dtype})" if self.peak else ""
        self.log(f"batch: {config.batch_size} sequences/step = micro {config.micro_batch_size} x "
                 f"accumulation {self.accum_steps} x {self.context.world_size} rank(s); "
                 f"{config.max_steps} steps, dtype {config.dtype} on {self.device}{peak}")
        if self.state.step:
            self.log(f"resuming at step {self.state.step} ({self.state.tokens_seen:,} tokens seen)")

    def _report_end(self, interrupted: str | None) -> None:
        rate = self._tokens_per_s()
        summary = f"step {self.state.step}/{self.config.max_steps}, {self.state.tokens_seen:,} tokens"
        if self.state.train_loss is not None:
            summary += f", train loss {self.state.train_loss:.4f}"
        if self.state.val_loss is not None:
            summary += f", validation loss {self.state.val_loss:.4f}"
        if rate:
            summary += f", {rate:,.0f} tokens/s"
        self.log(("stopped: " if interrupted else "done: ") + summary + f"; checkpoint in {self.out_dir}")

    # -- checkpoints ---------------------------------------------------------------

    def training_info(self) -> dict[str, Any]:
        return {**self.run_info, "steps": self.state.step, "tokens_seen": self.state.tokens_seen,
                "train_loss": self.state.train_loss, "val_loss": self.state.val_loss}

    def _save(self, final: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True) if self.context.fsdp else None
        optimizer_state = get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)
        model_for_save = _full_model(self.model, self.context) if self.save_fn is None else self.model
        if self.context.is_main:
            extra_files = self._state_files(optimizer_state, final)
            info = self.training_info()
            if self.save_fn is not None:
                self.save_fn(self.out_dir, extra_files, info)
            else:
                from model.checkpoint import save_checkpoint

                save_checkpoint(self.out_dir, model_for_save, self.tokenizer, extra_metadata={"training": info},
                                extra_files=extra_files, model_card=model_card(self.out_dir.name, info))
        barrier(self.context)

    def _state_files(self, optimizer_state: dict, final: bool) -> dict[str, Callable[[Path], None]]:
        tensors = {f"optimizer/{name}/{key}": value.detach().cpu().contiguous()
                   for name, entries in optimizer_state["state"].items() for key, value in entries.items()}
        tensors["rng/torch_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.device(self.device).type == "cuda":
            for index, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda_{index}"] = rng
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
                  for group in optimizer_state["param_groups"]]
        state_json = {
            "format": STATE_FORMAT, "version": 1, "step": self.state.step, "tokens_seen": self.state.tokens_seen,
            "train_loss": self.state.train_loss, "val_loss": self.state.val_loss,
            "train_data": self.train_data.state_dict(), "config": self.config.to_json(),
            "trainable": {name: list(param.shape) for name, param in self.trainable},
            "param_groups": groups, "world_size": self.context.world_size,
        }
        files: dict[str, Callable[[Path], None]] = {
            STATE_TENSORS: lambda path: save_file(tensors, str(path)),
            STATE_JSON: lambda path: path.write_text(json.dumps(state_json, indent=1) + "\n", encoding="utf-8"),
            METRICS_FILE: self.metrics.write_jsonl,
        }
        if final and any("loss" in r for r in self.metrics.records):
            files[LOSS_CURVE] = lambda path: plot_loss_curve(self.metrics.records, path, self.out_dir.name)
        return files

    def _restore(self, saved: "TrainingState") -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        expected = {name: tuple(param.shape) for name, param in self.trainable}
        if saved.trainable != expected:
            differing = sorted(set(saved.trainable.items()) ^ set(expected.items()))
            raise CheckpointError(f"{self.out_dir / STATE_JSON}: cannot resume, the trainable parameters differ "
                                  f"from this run's (first difference: {differing[0][0] if differing else '?'})")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True) if self.context.fsdp else None
        set_optimizer_state_dict(self.wrapped, self.optimizer, saved.optimizer_state(), options=options)
        self.train_data.load_state_dict(saved.json["train_data"])
        torch.set_rng_state(saved.tensors["rng/torch_cpu"])
        if torch.device(self.device).type == "cuda":
            cuda_states = [saved.tensors[k] for k in sorted(saved.tensors) if k.startswith("rng/cuda_")]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
        self.state.step = saved.json["step"]
        self.state.tokens_seen = saved.json["tokens_seen"]
        self.state.train_loss, self.state.val_loss = saved.json.get("train_loss"), saved.json.get("val_loss")
        self.metrics = MetricsLog.read_jsonl(self.out_dir / METRICS_FILE, self.state.step, self.metrics.live_file)
        self._note_config_changes(saved.json.get("config", {}))

    def _note_config_changes(self, saved_config: dict[str, Any]) -> None:
        current = self.config.to_json()
        watched = ("max_steps", "batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "dtype")
        changed = [f"{k} {saved_config.get(k)} -> {current[k]}" for k in watched
                   if k in saved_config and _jsonish(saved_config[k]) != _jsonish(current[k])]
        if changed:
            self.log("note: resuming with changed settings: " + ", ".join(changed))


def model_card(name: str, info: dict[str, Any]) -> str:
    """A short README.md for a trained checkpoint, from its training info."""
    how = f"`hearth {info['command']}`" if info.get("command") else "Hearth's trainer"
    shape = f" (preset `{info['preset']}`, sequence length {info.get('seq_len')})" if info.get("preset") else ""
    losses = [f"{label} {info[key]:.4f}" for label, key in (("train loss", "train_loss"), ("validation loss", "val_loss"))
              if info.get(key) is not None]
    card = (f"# {name}\n\nTrained with {how}{shape}: {info['steps']:,} steps, {info['tokens_seen']:,} tokens"
            f"{'; ' + ', '.join(losses) if losses else ''}.\n")
    sources = (info.get("data") or {}).get("sources") if isinstance(info.get("data"), dict) else None
    if sources:
        card += "\n## Data\n\n" + "".join(f"- `{s}`\n" for s in sources)
    return card


def _open_log_file(log_file: str | None) -> Path | None:
    """The live metrics file, its folder created; a clear error when it cannot be written."""
    if not log_file:
        return None
    path = Path(log_file)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        raise TrainingError(f"--log-file {path}: cannot write ({exc.strerror})") from None
    return path


def _jsonish(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _full_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """The model with whole (unsharded) CPU weights, for writing a checkpoint; a collective under FSDP."""
    if not context.fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not context.is_main:
        return model
    clone = type(model)(model.config)
    clone.load_state_dict(full_state, strict=False)
    return clone


@dataclass
class TrainingState:
    """A checkpoint's training_state.json and training_state.safetensors."""

    json: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def trainable(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.json["trainable"].items()}

    def optimizer_state(self) -> dict[str, Any]:
        state: dict[str, dict[str, Tensor]] = {}
        for key, tensor in self.tensors.items():
            if key.startswith("optimizer/"):
                name, entry = key[len("optimizer/"):].rsplit("/", 1)
                state.setdefault(name, {})[entry] = tensor
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in self.json["param_groups"]]
        return {"state": state, "param_groups": groups}


def read_training_state(folder: Path) -> TrainingState:
    """Load and check the resumable state of a checkpoint folder."""
    json_file, tensor_file = folder / STATE_JSON, folder / STATE_TENSORS
    if not json_file.is_file() or not tensor_file.is_file():
        raise CheckpointError(f"{folder}: no training state to resume from ({STATE_JSON} missing); "
                              "it was not written by a Hearth training run")
    try:
        state = json.loads(json_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{json_file}: not valid JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{json_file}: not a Hearth training state")
    try:
        tensors = load_file(str(tensor_file))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{tensor_file}: corrupt ({str(exc).splitlines()[0]})") from None
    return TrainingState(state, tensors)


def train_config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
