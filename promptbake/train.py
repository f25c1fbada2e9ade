"""The training loop: one method step (--method) per fresh batch, then clip, update, log and checkpoint.

Batches, seeds and the learning rate are pure functions of (seed, step), so a bake resumed
from its work folder ends with exactly the adapter an uninterrupted one would have.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from .checkpoint import work_path
from .config import DistillConfig
from .data import Messages, spread
from .errors import TrainingError
from .eval.report import per_token_mean
from .methods import PhaseTimer, make_method
from .setup import Run

MAX_GRAD_NORM = 1.0  # gradients are clipped to this norm before each update


def train(cfg: DistillConfig, run: Run, console: Console) -> None:
    """Run steps run.work has not done yet, up to cfg.steps; checkpoints go to the work folder."""
    import torch

    method = make_method(cfg, run.pair)
    cuda = run.device.type == "cuda"
    params, optimizer = run.params, run.optimizer
    # `progress` starts after the last checkpoint, saves new ones, and turns Ctrl-C / SIGTERM
    # into a checkpoint and a clean exit.
    with (run.work.training(run.student, optimizer, steps=cfg.steps, save_every=cfg.save_every) as progress,
          StepLog(console, cfg.steps, progress.done, method.loss_name) as log):
        for step in range(progress.done + 1, cfg.steps + 1):
            batch = step_batch(run.train, cfg, step)
            torch.manual_seed(step_seed(cfg.seed, step))  # LoRA dropout
            gen = torch.Generator(run.device).manual_seed(step_seed(cfg.seed, step))
            timer = PhaseTimer(run.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(run.device)  # each row's peak is its own step's
            stats = method.step(batch, gen, timer)  # gradients are in the LoRA weights now
            with timer("optim"):
                grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM).item()
            if not (math.isfinite(stats.loss) and math.isfinite(grad_norm)):
                bad = stats.loss if not math.isfinite(stats.loss) else grad_norm
                raise diverged(f"step {step}: the loss or gradient became {bad}", cfg, progress.kept())
            lr = lr_at(step, cfg.steps, cfg.lr, cfg.lr_schedule)
            with progress.update():  # Ctrl-C waits for this block: the update, its metrics row and checkpoint
                with timer("optim"):
                    for group in optimizer.param_groups:  # set each step, so a resumed bake needs no scheduler
                        group["lr"] = lr
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if not torch.stack([p.isfinite().all() for p in params]).all():  # never checkpoint inf weights
                        raise diverged(f"step {step}: the update made the LoRA weights inf or nan", cfg,
                                       progress.kept())
                peak = torch.cuda.max_memory_allocated(run.device) / 2**20 if cuda else None
                row = step_row(step, stats, grad_norm, timer.seconds, lr, peak_memory_mib=peak)
                progress.finished(step, row)  # metrics.jsonl; a checkpoint every --save-every steps and at the end
            log.step(row)
            if step == 1 and run.pair.prefix is not None and run.pair.prefix_misses:
                console.print(f"[yellow]note:[/] the teacher runs full passes, without its system-prompt prefix "
                              f"cache, because {escape(run.pair.prefix.miss)}.", highlight=False)


def step_row(step: int, stats, grad_norm: float, seconds: dict[str, float], lr: float,
             peak_memory_mib: float | None = None) -> dict:
    """The metrics.jsonl row of a finished step; on CUDA with the step's peak allocated GPU memory.
    "kl" is the method's training loss (reverse KL for opcd, forward KL for offpolicy, cross-entropy
    for sft: the bake's --method says which)."""
    total = sum(seconds.values())
    row = {
        "step": step, "kl": round(stats.loss, 6), "response_tokens": stats.tokens,
        "tokens_per_s": round(stats.rollout_tokens / seconds["rollout"], 2), "grad_norm": round(grad_norm, 6),
        "rollout_s": round(seconds["rollout"], 3), "teacher_s": round(seconds.get("teacher", 0.0), 3),
        "student_s": round(seconds["student"], 3), "optim_s": round(seconds["optim"], 3), "step_s": round(total, 3),
        "lr": lr,
    }
    if peak_memory_mib is not None:
        row["peak_memory_mib"] = round(peak_memory_mib, 1)
    return row


@dataclass
class HeldoutKL:
    """The held-out measurement: mean per-token reverse KL, its standard error, and what it cost."""

    value: float
    stderr: float  # of the per-token mean, with prompts as the sampling unit
    prompts: int
    tokens: int
    seconds: float


def heldout_kl(run: Run, heldout: list[Messages], cfg: DistillConfig, console: Console, when: str) -> HeldoutKL:
    """Mean per-token KL(student || teacher) on student samples of the held-out prompts, fixed seed.

    Bounded so it doesn't dominate a short bake: at most --heldout-prompts prompts, spread over the
    held-out split, sampled twice --batch-size at a time (sampling is memory-bound at small batches,
    so a wider batch costs little more per step). The standard error says what precision that buys.
    """
    import torch

    from .losses import row_sums

    prompts = spread(heldout, cfg.heldout_prompts) if cfg.heldout_prompts else heldout
    batch = 2 * cfg.batch_size
    gen = torch.Generator(run.device).manual_seed(step_seed(cfg.seed, 0) + 17)
    sums, counts = [], []  # per prompt: summed KL and response tokens
    t0 = time.perf_counter()
    with console.status(f"held-out KL {when} training ({len(prompts)} prompts)"):
        for i in range(0, len(prompts), batch):
            ro = run.pair.rollout(prompts[i : i + batch], gen)
            lengths = [len(r) for r in ro.responses]
            sums += row_sums(run.pair.reverse_kl(ro), lengths)  # (N,) in rollout order
            counts += lengths
    value, stderr = per_token_mean(sums, counts)
    result = HeldoutKL(value, stderr, len(counts), sum(counts), time.perf_counter() - t0)
    console.print(f"held-out reverse KL per token {when} training: {value:.4f} ± {stderr:.4f} "
                  f"({result.prompts} prompts, {result.tokens} tokens, {result.seconds:.0f} s)", highlight=False)
    return result


def step_batch(train: list[Messages], cfg: DistillConfig, step: int) -> list[Messages]:
    """Step `step`'s batch: --batch-size / N prompts, each N (--samples-per-prompt) times in a row; the
    shared generator gives every copy its own sample."""
    n = cfg.samples_per_prompt
    return [train[i] for i in batch_indices(len(train), cfg.batch_size // n, step, cfg.seed) for _ in range(n)]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Prompt indices for `step` (1-based): walk seeded permutations of range(n), one epoch after another.

    A pure function of its arguments, so a resumed run draws exactly the same batches.
    """
    start = (step - 1) * batch_size
    out = []
    epoch, offset = divmod(start, n)
    while len(out) < batch_size:
        order = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out.extend(order[offset : offset + batch_size - len(out)])
        epoch, offset = epoch + 1, 0
    return out


def lr_at(step: int, steps: int, lr: float, schedule: str) -> float:
    """The learning rate of `step` (1-based) of `steps`; a pure function, so there is no scheduler state to save.

    constant: lr at every step. cosine: a linear warm-up over the first W = max(1, steps / 10, rounded)
    steps (step s gets lr * s / W, so step 1 already learns), then a cosine decay from lr to 0.1 * lr
    at the last step: never 0, so the last steps still move the adapter.
    """
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    warmup = max(1, (steps + 5) // 10)  # a tenth, rounded half up
    if step <= warmup:
        return lr * step / warmup
    progress = (step - warmup) / (steps - warmup)  # (0, 1]: 1 at the last step
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**63


def diverged(what: str, cfg: DistillConfig, kept: str) -> TrainingError:
    return TrainingError(f"{what}; nothing was written to {cfg.out} and {kept}. Lower --lr (now {cfg.lr}) or use "
                         f"--quant none, and delete {work_path(cfg.out)} to start afresh.")


class StepLog:
    """A live progress bar on a terminal; one plain line per step elsewhere (CI logs)."""

    def __init__(self, console: Console, steps: int, done: int = 0, loss_name: str = "reverse KL"):
        self.console, self.steps, self.loss_name = console, steps, loss_name
        self.progress = None
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=console, transient=False,
            )
            self.task = self.progress.add_task("bake", total=steps, completed=done, info="sampling first batch")

    def __enter__(self):
        if self.progress:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)

    def step(self, row: dict) -> None:
        info = f"{self.loss_name}/token {row['kl']:.4f}  {row['tokens_per_s']:.0f} tok/s  {row['step_s']:.1f} s/step"
        if self.progress:
            self.progress.update(self.task, advance=1, info=info)
        else:
            self.console.print(f"step {row['step']}/{self.steps}  {info}", highlight=False)
