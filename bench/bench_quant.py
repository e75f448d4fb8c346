"""Quantization benchmark: perplexity, size on disk and single-stream decode speed.

    python bench/bench_quant.py                       # both parts (~10 min on 2 cores)
    python bench/bench_quant.py --part speed          # `small` preset, random weights, 2 threads
    python bench/bench_quant.py --part quality --steps 400

Speed: one fp32 `small` checkpoint (vocab 32000, random weights) is saved,
quantized with `quantize_checkpoint`, and each variant is loaded as a user
would (`load_checkpoint`) and decoded greedily through the reference
generator (model/generate.py), side by side in interleaved rounds (median of
rounds). The read bandwidth is measured in the same run (sum of a 1 GiB
tensor); the bound for each variant is that bandwidth over the bytes of
weights read per token (every linear layer and the LM head; one embedding
row is noise). "matmul ms" is the time of the same linear layers called
alone on one token: the rest of a step is attention, norms, rotary, the KV
cache and Python.

Quality: a `mini`-shaped model with an untied LM head (like `small`) is
trained from scratch with a plain AdamW loop on Shakespeare (the corpus in
/work/shared when present, else tests/fixtures), saved, quantized in each
variant, loaded and scored on held-out text (the last 5%, never trained on).
With `--checkpoint DIR --data PATH...` a model trained by `hearth pretrain` /
`hearth sft` is quantized instead and every variant is scored by `hearth
eval`'s own code (text perplexity, or assistant-token perplexity on chats):

    python bench/bench_quant.py --part quality --checkpoint runs/default-sft \
        --data ../shared/corpus/wordnet-chat-valid.jsonl.gz
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.decoder import Transformer  # noqa: E402
from model.generate import GenerationSettings, generate  # noqa: E402
from model.quant import DEFAULT_SKIP, QuantizationError, QuantizedEmbedding, QuantizedLinear, quantize_checkpoint  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_TEXT = Path("/work/shared/corpus/shakespeare.txt.gz")
FIXTURE_TEXT = ROOT / "tests" / "fixtures" / "shakespeare_sample.txt"


@dataclass
class Variant:
    """One way to store the same model."""

    label: str  # row name in the tables
    method: str | None  # None: full precision
    group_size: int | None = None
    skip: tuple[str, ...] = DEFAULT_SKIP  # modules kept in bf16
    dtype: torch.dtype | None = None  # full precision only: load in this dtype
    engine_pack: bool = False  # speed: swap bf16 linears for the serving engine's packed oneDNN ones


def build_variant(variant: Variant, source: Path, workdir: Path) -> Path:
    if variant.method is None:
        return source
    out = workdir / variant.label.replace(" ", "_").replace(",", "")
    quantize_checkpoint(source, out, variant.method, variant.group_size, list(variant.skip))
    return out


def file_mb(folder: Path) -> float:
    return (folder / "model.safetensors").stat().st_size / 1e6


# ---------------------------------------------------------------- speed


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """nn.Linear, QuantizedLinear and the engine's packed linears: whatever reads a weight per token."""
    return [m for m in model.modules() if hasattr(m, "out_features") and not isinstance(m, QuantizedEmbedding)]


def weight_bytes(layer: nn.Module) -> int:
    if isinstance(layer, QuantizedLinear):  # data, scales and zeros
        return sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    element_size = layer.weight.element_size() if isinstance(layer, nn.Linear) else 2  # packed: bf16
    return layer.in_features * layer.out_features * element_size


def weight_bytes_per_token(model: nn.Module) -> int:
    return sum(weight_bytes(layer) for layer in linear_layers(model))


def read_bandwidth_gbs(repeats: int = 5) -> float:
    big = torch.ones(256 * 1024 * 1024)  # 1 GiB of fp32
    big.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - start)
    return big.numel() * 4 / best / 1e9


def decode_tokens_per_second(model: nn.Module, prompt_ids: list[int], new_tokens: int) -> float:
    """Greedy decode through the reference generator; the prefill and first token are not timed."""
    stream = generate(model, prompt_ids, GenerationSettings(max_tokens=new_tokens + 1, temperature=0))
    next(stream)
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    return count / (time.perf_counter() - start)


@torch.no_grad()
def matmul_ms_per_token(model: nn.Module, repeats: int = 5) -> float:
    """Time of the model's linear layers alone on one token (best of `repeats`)."""
    dtype = model.norm.weight.dtype
    layers = [(layer, torch.randn(1, 1, layer.in_features, dtype=dtype)) for layer in linear_layers(model)]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer, x in layers:
            layer(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


try:  # the serving engine's bf16 fast path, when this checkout has it
    from server.engine.cpu_fast import pack_model as ENGINE_PACK  # noqa: E402
except ImportError:
    ENGINE_PACK = None


def load_for_speed(folder: Path, variant: Variant) -> nn.Module:
    model = load_checkpoint(folder, dtype=variant.dtype).model
    if variant.engine_pack:
        ENGINE_PACK(model)
    return model


def run_speed(args: argparse.Namespace, workdir: Path) -> None:
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_preset("small", vocab_size=32000)
    tokenizer = Tokenizer.train(iter(FIXTURE_TEXT.read_text().splitlines(True)), vocab_size=512)
    source = workdir / "small-fp32"
    save_checkpoint(source, Transformer(config).init_weights(0), tokenizer)
    variants = [
        Variant("fp32", None, dtype=torch.float32),
        Variant("bf16", None, dtype=torch.bfloat16),
        Variant("bf16, engine's packed linears", None, dtype=torch.bfloat16, engine_pack=True),
        Variant("int8", "int8"),
        Variant("int8, lm_head bf16 packed", "int8", skip=("embed", "lm_head"), engine_pack=True),
        Variant("int4 g32", "int4", 32),
        Variant("int4 g32, lm_head bf16 packed", "int4", 32, skip=("embed", "lm_head"), engine_pack=True),
        Variant("int4 g128", "int4", 128),
    ]
    variants = [v for v in variants if (not args.only or v.label in args.only) and (ENGINE_PACK or not v.engine_pack)]
    folders = {v.label: build_variant(v, source, workdir) for v in variants}
    prompt = list(range(1, 9))
    models, load_seconds = {}, {}
    for variant in variants:
        start = time.perf_counter()
        models[variant.label] = load_for_speed(folders[variant.label], variant)
        decode_tokens_per_second(models[variant.label], prompt, 1)  # int4 packs at first use
        load_seconds[variant.label] = time.perf_counter() - start
    rates: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(args.rounds):  # interleaved, so load from other processes hits every variant alike
        for label, model in models.items():
            rates[label].append(decode_tokens_per_second(model, prompt, args.new_tokens))
    bandwidth = read_bandwidth_gbs()
    fp32_mb = file_mb(source)
    print(f"\n## Decode, `small` (vocab 32000), {args.threads} threads, {args.new_tokens} tokens after an "
          f"8-token prompt, median of {args.rounds} rounds; read bandwidth {bandwidth:.1f} GB/s\n")
    print("| weights | file MB | % of fp32 | load + first token s | tok/s (median, best) | ms/token | matmul ms "
          "| weight MB/token | bound tok/s | % of bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant in variants:
        label, model = variant.label, models[variant.label]
        median, best = statistics.median(rates[label]), max(rates[label])
        mb_per_token = weight_bytes_per_token(model) / 1e6
        bound = bandwidth * 1e3 / mb_per_token
        print(f"| {label} | {file_mb(folders[label]):.1f} | {file_mb(folders[label]) / fp32_mb:.1%} | {load_seconds[label]:.1f} | "
              f"{median:.1f} ({best:.1f}) | {1e3 / median:.2f} | {matmul_ms_per_token(model):.2f} | "
              f"{mb_per_token:.1f} | {bound:.0f} | {median / bound:.0%} |")


# ---------------------------------------------------------------- quality


def read_corpus(limit_chars: int) -> str:
    if SHARED_TEXT.is_file():
        import gzip

        return gzip.open(SHARED_TEXT, "rt", encoding="utf-8").read()[:limit_chars]
    return FIXTURE_TEXT.read_text()


def train_model(config: ModelConfig, tokens: torch.Tensor, steps: int, batch: int, seq_len: int) -> Transformer:
    """Plain AdamW with warmup and cosine decay, bf16 autocast, from scratch."""
    model = Transformer(config).init_weights(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    start_time = time.perf_counter()
    for step in range(steps):
        lr_scale = min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * max(lr_scale, 0.1)
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=generator).tolist()
        inputs = torch.stack([tokens[s : s + seq_len] for s in starts])
        targets = torch.stack([tokens[s + 1 : s + seq_len + 1] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - start_time:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int) -> float:
    windows = (len(tokens) - 1) // seq_len
    inputs = tokens[: windows * seq_len].view(windows, seq_len)
    targets = tokens[1 : windows * seq_len + 1].view(windows, seq_len)
    total = 0.0
    for row in range(0, windows, 8):
        logits = model(inputs[row : row + 8]).float()
        total += F.cross_entropy(logits.flatten(0, 1), targets[row : row + 8].flatten(), reduction="sum").item()
    return math.exp(total / targets.numel())


QUALITY_VARIANTS = [
    Variant("fp32", None, dtype=torch.float32),
    Variant("bf16", None, dtype=torch.bfloat16),
    Variant("int8 (all)", "int8", skip=()),
    Variant("int8, embed bf16", "int8", skip=("embed",)),
    Variant("int8, embed + lm_head bf16", "int8", skip=("embed", "lm_head")),
    Variant("int8 g32", "int8", 32),
    Variant("int4 g32 (all)", "int4", 32, skip=()),
    Variant("int4 g32, embed bf16", "int4", 32, skip=("embed",)),
    Variant("int4 g32, embed + lm_head bf16", "int4", 32, skip=("embed", "lm_head")),
    Variant("int4 g64", "int4", 64),
    Variant("int4 g128", "int4", 128),
]


def run_quality_checkpoint(args: argparse.Namespace, workdir: Path) -> None:
    """Quantize a trained checkpoint in every variant and score each with `hearth eval`'s code."""
    from trainer.evaluate import evaluate

    results = []
    for variant in QUALITY_VARIANTS:
        try:
            folder = build_variant(variant, args.checkpoint, workdir)
        except QuantizationError as error:  # e.g. a group size that does not divide this model's widths
            print(f"  {variant.label}: skipped ({error})")
            continue
        result = evaluate(load_checkpoint(folder, dtype=variant.dtype), args.data, limit=args.limit)
        results.append((variant.label, result.get("perplexity", result.get("assistant_perplexity")), file_mb(folder)))
        print(f"  {variant.label}: {results[-1][1]:.4f}", flush=True)
    what = "assistant-token perplexity" if "assistant_perplexity" in result else "perplexity"
    print(f"\n## {what} of {args.checkpoint} on {', '.join(map(str, args.data))} ({result.get('chats', result.get('documents'))} "
          f"{'chats' if 'chats' in result else 'documents'}, {result['tokens']} tokens)\n")
    print_quality_table(results)


def print_quality_table(results: list[tuple[str, float, float]]) -> None:
    base_ppl, base_mb = results[0][1], results[0][2]
    print("| weights | perplexity | vs fp32 | file MB | % of fp32 |")
    print("|---|---|---|---|---|")
    for label, ppl, mb in results:
        print(f"| {label} | {ppl:.3f} | {ppl / base_ppl - 1:+.2%} | {mb:.1f} | {mb / base_mb:.1%} |")


def run_quality(args: argparse.Namespace, workdir: Path) -> None:
    torch.set_num_threads(args.threads)
    text = read_corpus(args.corpus_chars)
    split = int(len(text) * 0.95)
    tokenizer = Tokenizer.train(iter(text[:split].splitlines(True)), vocab_size=args.vocab)
    train_tokens = torch.tensor(tokenizer.encode(text[:split]))
    held_out = torch.tensor(tokenizer.encode(text[split:]))[: args.eval_tokens + 1]
    config = ModelConfig.from_preset("mini", vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    print(f"training mini (untied, vocab {tokenizer.vocab_size}, {config.num_params() / 1e6:.1f}M params) "
          f"for {args.steps} steps of {args.batch}x{args.seq_len} tokens on {len(train_tokens)} tokens")
    source = workdir / "mini-fp32"
    save_checkpoint(source, train_model(config, train_tokens, args.steps, args.batch, args.seq_len), tokenizer)
    results = []
    for variant in QUALITY_VARIANTS:
        folder = build_variant(variant, source, workdir)
        model = load_checkpoint(folder, dtype=variant.dtype).model
        results.append((variant.label, perplexity(model, held_out, args.seq_len), file_mb(folder)))
    print(f"\n## Perplexity on {len(held_out) - 1} held-out tokens (mini shape, untied, trained {args.steps} steps)\n")
    print_quality_table(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("speed", "quality", "all"), default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="speed: interleaved rounds per variant")
    parser.add_argument("--new-tokens", type=int, default=64, help="speed: tokens decoded per round")
    parser.add_argument("--only", nargs="*", help="speed: variant labels to run (default all)")
    parser.add_argument("--steps", type=int, default=400, help="quality: training steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--corpus-chars", type=int, default=2_000_000)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--checkpoint", type=Path, help="quality: quantize this trained checkpoint instead of training one")
    parser.add_argument("--data", nargs="+", help="quality with --checkpoint: held-out text or chats to score")
    parser.add_argument("--limit", type=int, default=None, help="quality with --checkpoint: documents or chats scored")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hearth-bench-quant-") as tmp:
        if args.part in ("quality", "all"):
            (run_quality_checkpoint if args.checkpoint else run_quality)(args, Path(tmp))
        if args.part in ("speed", "all"):
            run_speed(args, Path(tmp))


if __name__ == "__main__":
    main()
