"""Causal-LM benchmark: a small GPT-2 on the Python standard library's source, byte-level,
trained by ``transformers.Trainer`` with dense AdamW, static 2:4 and BAME 2:4 (AdamW).

Each run builds ``GPT2LMHeadModel`` from a ``GPT2Config`` (vocabulary 256, no download), the
optimizer through :func:`bame_optim.methods.make_optimizer` over
``nm_param_groups(model, n, m, weight_decay=...)``, a cosine schedule with warm-up, and trains
it with ``Trainer(optimizers=(opt, scheduler))`` for ``--steps`` optimizer steps (the
optimizer's ``total_steps``), evaluating the validation loss at step 0 and ``--evals`` times
during training. After every run the sparse parameters are checked to be exactly N:M (N kept
per block of M, at most N non-zeros). Prints and writes (``--output-dir``) a table of the final
validation loss and perplexity (mean ± std over seeds), the training-FLOPs ratio
(:mod:`bame_optim.flops`), the training time and the sparse parameters; the per-run rows, the
validation curves (CSV) and a plot of them. The data: :mod:`benchmarks.lm_data`::

    .venv/bin/python -m benchmarks.lm --quick    # smoke run: 1-3 min on 2 quiet CPU cores
    .venv/bin/python -m benchmarks.lm            # 3 methods x 3 seeds: ~20-25 min, 2 quiet cores

(Timings: :file:`docs/results/lm/README.md`.)
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from bame_optim import nm_param_groups
from bame_optim.flops import flops_breakdown, layer_flops
from bame_optim.methods import METHODS, make_optimizer

from .harness import nm_pattern, write_csv
from .lm_data import SEPARATOR, VOCAB_SIZE, StdlibText, load_stdlib_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ("dense_adamw", "static_adamw", "bame_adamw")
ADAMW_METHODS = tuple(name for name, method in METHODS.items() if method.optimizer == "adamw")


@dataclass(frozen=True)
class LMConfig:
    """One run's settings (the same for every method and seed)."""

    steps: int = 240
    batch_size: int = 16
    block_size: int = 128
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 12
    evals: int = 6
    """Evaluations during training, evenly spaced (plus the one at step 0)."""
    train_bytes: int = 2_000_000
    val_bytes: int = 32_000
    delta_t: int | None = None
    """BAME's ΔT; ``None``: ``max(1, steps // 30)`` (about 10 updates in the evolve window)."""
    eval_batch_size: int = 64

    @property
    def schedule_delta_t(self) -> int:
        return self.delta_t if self.delta_t is not None else max(1, self.steps // 30)

    @property
    def eval_steps(self) -> int:
        return max(1, math.ceil(self.steps / self.evals))


DEFAULT = LMConfig()
QUICK = LMConfig(steps=40, batch_size=8, n_layer=2, n_embd=128, warmup_steps=4, evals=4,
                 train_bytes=300_000, val_bytes=16_000)
"""A smoke run: a 2-layer, 128-wide model, 40 steps."""


def build_model(cfg: LMConfig, seed: int) -> nn.Module:
    """``GPT2LMHeadModel`` of ``cfg``'s sizes, vocabulary 256, initialised from ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=SEPARATOR,
        eos_token_id=SEPARATOR,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def build_optimizer(
    method: str, model: nn.Module, cfg: LMConfig, pattern: tuple[int, int], total_steps: int,
    seed: int,
) -> torch.optim.Optimizer:
    """``method``'s optimizer over ``nm_param_groups(model, n, m, weight_decay=...)``
    (biases and norm weights undecayed), scheduled over ``total_steps`` optimizer steps."""
    n, m = pattern
    groups = nm_param_groups(model, n, m, weight_decay=cfg.weight_decay)
    return make_optimizer(
        method, groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, n=n, m=m,
        total_steps=total_steps, delta_t=cfg.schedule_delta_t, seed=seed,
    )


def sparsity(opt: torch.optim.Optimizer, pattern: tuple[int, int]) -> dict[str, Any]:
    """The sparse parameters of ``opt`` (``sparsity_report()``; none for a torch optimizer):
    their count, weights, kept weights, and whether every one is exactly N:M (at most N
    non-zeros per block and a mask keeping N of every M)."""
    report = getattr(opt, "sparsity_report", None)
    rows = [row for row in report() if row["sparse"]] if report is not None else []
    if rows:
        opt.check_nm()  # raises naming any sparse weight that is not N:M
    n, m = pattern
    weights = [math.prod(row["shape"]) for row in rows]
    exact = [bool(row["nm_valid"]) and row["density"] == n / m for row in rows]
    return {
        "sparse_params": len(rows),
        "sparse_weights": sum(weights),
        "kept_weights": round(sum(w * row["density"] for w, row in zip(weights, rows,
                                                                         strict=True))),
        "nm_exact": all(exact),
        "not_nm": [row["name"] for row, ok in zip(rows, exact, strict=True) if not ok],
    }


def flops_ratio(
    model: nn.Module, method: str, cfg: LMConfig, pattern: tuple[int, int]
) -> dict[str, Any]:
    """Training-FLOPs ratio of ``method`` (:mod:`bame_optim.flops` on one block of token ids:
    the Conv1D projections, sparse along their input dimension, the attention products and the
    LM head) and the number of layers it counts."""
    n, m = pattern
    layers = layer_flops(model, (cfg.block_size,), n=n, m=m, dtype=torch.long)
    breakdown = flops_breakdown(layers, method, n=n, m=m, total_steps=cfg.steps,
                                delta_t=cfg.schedule_delta_t)
    return {"flops_ratio": breakdown["ratio"], "flops_layers": len(layers)}


def run_one(
    method: str, seed: int, data: StdlibText, cfg: LMConfig, pattern: tuple[int, int],
    scratch: Path, use_cpu: bool,
) -> dict[str, Any]:
    """Train ``method`` from ``seed`` with the Trainer (``output_dir=scratch``; it saves no
    checkpoint); the run's metrics and its curve."""
    import transformers
    from transformers import Trainer, TrainingArguments

    model = build_model(cfg, seed)
    args = TrainingArguments(
        output_dir=str(scratch), max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        eval_strategy="steps", eval_steps=cfg.eval_steps, logging_strategy="steps",
        logging_steps=cfg.eval_steps, save_strategy="no", report_to="none", use_cpu=use_cpu,
        seed=seed, data_seed=seed, dataloader_num_workers=0, dataloader_drop_last=True,
        prediction_loss_only=True, disable_tqdm=True,
    )
    total_steps = args.max_steps  # max_steps set: the Trainer runs exactly this many steps
    opt = build_optimizer(method, model, cfg, pattern, total_steps, seed)
    scheduler = transformers.get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, total_steps)
    trainer = Trainer(model=model, args=args, train_dataset=data.blocks["train"],
                      eval_dataset=data.blocks["validation"], optimizers=(opt, scheduler))
    trainer.remove_callback(transformers.PrinterCallback)  # disable_tqdm's log printer
    start = time.perf_counter()
    first = trainer.evaluate()  # step 0, the initial model (train() starts a new log_history)
    output = trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    eval_seconds = sum(float(e["eval_runtime"]) for e in evals)  # inside train()
    if not evals or evals[-1]["step"] != total_steps:  # steps not a multiple of eval_steps
        trainer.evaluate()
        evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    wall = time.perf_counter() - start

    if trainer.state.global_step != total_steps:
        raise RuntimeError(f"{method}: the Trainer ran {trainer.state.global_step} optimizer "
                           f"steps, not total_steps = {total_steps}")
    steps = {group.get("step") for group in opt.param_groups} - {None}
    if steps and steps != {total_steps}:
        raise RuntimeError(f"{method}: the optimizer counted {steps} steps, not {total_steps}")
    curve = [(0, float(first["eval_loss"]))]
    curve += [(int(e["step"]), float(e["eval_loss"])) for e in evals]
    sparse = sparsity(opt, pattern)
    if not sparse["nm_exact"]:
        raise RuntimeError(f"{method} seed {seed}: not exactly {pattern[0]}:{pattern[1]} after "
                           f"training: {sparse['not_nm']}")
    del sparse["not_nm"]
    return {
        "method": method,
        "pattern": "-" if sparse_free(method) else f"{pattern[0]}:{pattern[1]}",
        "seed": seed,
        "val_loss": curve[-1][1],
        "val_ppl": math.exp(curve[-1][1]),
        "first_val_loss": curve[0][1],
        "train_loss": float(output.training_loss),
        **flops_ratio(model, method, cfg, pattern),
        "train_seconds": float(output.metrics["train_runtime"]) - eval_seconds,
        "wall_seconds": wall,
        **sparse,
        "curve": curve,
    }


def sparse_free(method: str) -> bool:
    """Whether ``method`` is a dense torch optimizer (no N:M pattern)."""
    return METHODS[method].factory is torch.optim.AdamW


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per method, in first-seen order."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["method"], []).append(row)
    table = []
    for method, runs in grouped.items():
        loss, loss_std = _spread([r["val_loss"] for r in runs])
        ppl, ppl_std = _spread([r["val_ppl"] for r in runs])
        table.append({
            "method": method, "pattern": runs[0]["pattern"], "val_loss_mean": loss,
            "val_loss_std": loss_std, "val_ppl_mean": ppl, "val_ppl_std": ppl_std,
            "flops_ratio": runs[0]["flops_ratio"],
            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
            "sparse_params": runs[0]["sparse_params"], "sparse_weights": runs[0]["sparse_weights"],
            "nm_exact": all(r["nm_exact"] for r in runs),
            "seeds": " ".join(str(r["seed"]) for r in runs),
        })
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    lines = [
        "| method | N:M | val loss (mean ± std) | val perplexity | train FLOPs "
        "| train time / run (s) | sparse params (weights) | exactly N:M | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['val_loss_mean']:.4f} ± "
            f"{r['val_loss_std']:.4f} | {r['val_ppl_mean']:.3f} ± {r['val_ppl_std']:.3f} "
            f"| {r['flops_ratio']:.3f}x "
            f"| {r['train_seconds']:.1f} | {r['sparse_params']} ({r['sparse_weights']:,}) "
            f"| {'yes' if r['nm_exact'] else 'NO'} | {r['seeds']} |"
        )
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Validation loss against step per method: the mean over seeds, and a band from the
    lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        curves = [dict(r["curve"]) for r in rows if r["method"] == method]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        losses = [[c[s] for c in curves] for s in steps]
        line = ax.plot(steps, [statistics.fmean(v) for v in losses], label=method)[0]
        ax.fill_between(steps, [min(v) for v in losses], [max(v) for v in losses],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        choices=ADAMW_METHODS)
    parser.add_argument("--pattern", type=nm_pattern, default=(2, 4), help="N:M (default 2:4)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="the smoke-run settings (QUICK)")
    for field, kind in (("steps", int), ("batch_size", int), ("block_size", int),
                        ("n_layer", int), ("n_embd", int), ("n_head", int), ("lr", float),
                        ("weight_decay", float), ("warmup_steps", int), ("evals", int),
                        ("train_bytes", int), ("val_bytes", int), ("delta_t", int)):
        parser.add_argument(f"--{field.replace('_', '-')}", type=kind, default=None,
                            help=f"default {getattr(DEFAULT, field)} ({getattr(QUICK, field)} "
                            "with --quick)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "lm")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even if CUDA is there")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else DEFAULT
    overrides = {f: getattr(args, f) for f in asdict(cfg) if getattr(args, f, None) is not None}
    args.config = replace(cfg, **overrides)
    for name in ("steps", "batch_size", "block_size", "n_layer", "n_embd", "n_head", "evals",
                 "train_bytes", "val_bytes"):
        if getattr(args.config, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    if args.config.n_embd % args.config.n_head:
        parser.error("argument --n-head: must divide --n-embd")
    if args.config.delta_t is not None and args.config.delta_t < 1:
        parser.error("argument --delta-t: must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    cfg: LMConfig = args.config
    use_cpu = args.cpu or not torch.cuda.is_available()
    data = load_stdlib_text(cfg.block_size, cfg.train_bytes, cfg.val_bytes)
    jobs = [(method, seed) for method in args.methods for seed in args.seeds]
    rows: list[dict[str, Any]] = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with tqdm(total=len(jobs), desc="runs", unit="run") as bar:
            for method, seed in jobs:
                bar.set_postfix_str(f"{method} seed {seed}")
                with tempfile.TemporaryDirectory(prefix="bame-lm-") as scratch:
                    row = run_one(method, seed, data, cfg, args.pattern, Path(scratch), use_cpu)
                tqdm.write(f"{method} seed {seed}: val loss {row['val_loss']:.4f}, "
                           f"{row['sparse_params']} sparse params ({row['sparse_weights']:,} "
                           f"weights), {row['train_seconds']:.0f} s")
                rows.append(row)
                bar.update()
    finally:
        hf_logging.set_verbosity(verbosity)
    table = summarise(rows)
    seen = cfg.steps * cfg.batch_size * cfg.block_size
    settings = (
        f"{data.describe()}. GPT-2 {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} "
        f"heads, context {cfg.block_size}, vocabulary {VOCAB_SIZE}; {cfg.steps} steps of "
        f"{cfg.batch_size} blocks ({seen / 1e6:.2f} M tokens, "
        f"{seen / (len(data.blocks['train']) * cfg.block_size):.2f} epochs); AdamW lr "
        f"{cfg.lr}, betas {cfg.betas}, weight decay {cfg.weight_decay}, cosine with "
        f"{cfg.warmup_steps} warm-up steps; ΔT {cfg.schedule_delta_t}; "
        f"{'CPU' if use_cpu else 'CUDA'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads."
    )
    print("\n" + settings)
    print(format_table(table))
    if any(r["sparse_params"] == 0 for r in table if r["pattern"] != "-"):
        print("note: nm_param_groups made no GPT-2 weight sparse: the sparse methods trained "
              "a dense model")
    out = args.output_dir
    write_csv(table, out / "lm.csv")
    write_csv([{k: v for k, v in r.items() if k != "curve"} for r in rows], out / "lm_runs.csv")
    write_csv([{"method": r["method"], "seed": r["seed"], "step": step, "val_loss": loss}
               for r in rows for step, loss in r["curve"]], out / "lm_curves.csv")
    (out / "lm.md").write_text(f"{settings}\n\n{format_table(table)}\n")
    plot_curves(rows, out / "lm.png", f"GPT-2 {cfg.n_layer}x{cfg.n_embd} on the Python stdlib, "
                f"{cfg.steps} steps")
    print(f"wrote lm.csv, lm_runs.csv, lm_curves.csv, lm.md and lm.png to {out}")
    return table


if __name__ == "__main__":
    main()
