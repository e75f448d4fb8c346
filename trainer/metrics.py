"""Training feedback: the metrics log, the loss-curve plot, and model FLOPs utilisation.

Design choices:
- Every record (train and eval) is kept in memory (a few hundred small dicts)
  and written as `metrics.jsonl` into each checkpoint, so a resumed run's log
  and loss curve cover the whole run. A live copy can be appended to a file of
  the user's choice as the run goes (`--log-file`).
- MFU = achieved model FLOP/s / device peak. For CUDA the peak comes from a
  table of known parts; on CPU it is measured once with a short matmul probe at
  the training dtype (the achievable peak, since CPUs publish no number).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, by name fragment.
_CUDA_BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                    "RTX 4090": 165e12, "RTX 3090": 71e12, "L4": 121e12}


class MetricsLog:
    """In-memory list of metric records, optionally mirrored live to a JSONL file."""

    def __init__(self, records: list[dict[str, Any]] | None = None, live_file: Path | None = None):
        self.records = list(records or [])
        self.live_file = live_file

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.live_file is not None:
            with open(self.live_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def write_jsonl(self, path: Path) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")

    @classmethod
    def read_jsonl(cls, path: Path, up_to_step: int, live_file: Path | None = None) -> "MetricsLog":
        """Records of a checkpoint, dropping any past its step."""
        records = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record.get("step", 0) <= up_to_step:
                    records.append(record)
        return cls(records, live_file)

    def last(self, key: str) -> float | None:
        return next((r[key] for r in reversed(self.records) if key in r), None)


def plot_loss_curve(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Train (and validation) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        axes.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5, markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def peak_flops(device: str, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of the device at this dtype, or None when unknown."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        peak = next((p for key, p in _CUDA_BF16_PEAKS.items() if key in name), None)
        if peak is not None and dtype == torch.float32:
            peak /= 2 if "A100" not in name else 16  # TF32 on Hopper, plain fp32 on Ampere
        return peak
    if device == "cpu":
        return _measure_cpu_matmul_flops(dtype)
    return None


@functools.lru_cache(maxsize=None)  # once per process and dtype
def _measure_cpu_matmul_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 4) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
