"""The training loop: one method step (--method) per fresh batch, then clip, update, log and checkpoint.

Batches and seeds are pure functions of (seed, step), so a bake resumed from its work
folder ends with exactly the adapter an uninterrupted one would have.
"""

from __future__ import annotations

import math
import random

from rich.console import Console

from .checkpoint import work_path
from .config import DistillConfig
from .data import Messages
from .errors import TrainingError
from .methods import METHODS, PhaseTimer
from .setup import Run


def train(cfg: DistillConfig, run: Run, console: Console) -> None:
    """Run steps run.work has not done yet, up to cfg.steps; checkpoints go to the work folder."""
    import torch

    method = METHODS[cfg.method](run.pair)
    params, optimizer = run.params, run.optimizer
    # `progress` starts after the last checkpoint, saves new ones, and turns Ctrl-C / SIGTERM
    # into a checkpoint and a clean exit.
    with (run.work.training(run.student, optimizer, steps=cfg.steps, save_every=cfg.save_every) as progress,
          StepLog(console, cfg.steps, progress.done, method.loss_name) as log):
        for step in range(progress.done + 1, cfg.steps + 1):
            batch = [run.train[i] for i in batch_indices(len(run.train), cfg.batch_size, step, cfg.seed)]
            torch.manual_seed(step_seed(cfg.seed, step))  # LoRA dropout
            gen = torch.Generator(run.device).manual_seed(step_seed(cfg.seed, step))
            timer = PhaseTimer(run.device)
            stats = method.step(batch, gen, timer)  # gradients are in the LoRA weights now
            with timer("optim"):
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
            if not (math.isfinite(stats.loss) and math.isfinite(grad_norm)):
                bad = stats.loss if not math.isfinite(stats.loss) else grad_norm
                raise diverged(f"step {step}: the loss or gradient became {bad}", cfg, progress.kept())
            with progress.update():  # Ctrl-C waits for this block: the update, its metrics row and checkpoint
                with timer("optim"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if not torch.stack([p.isfinite().all() for p in params]).all():  # never checkpoint inf weights
                        raise diverged(f"step {step}: the update made the LoRA weights inf or nan", cfg,
                                       progress.kept())
                row = step_row(step, stats, grad_norm, timer.seconds, cfg.lr)
                progress.finished(step, row)  # metrics.jsonl; a checkpoint every --save-every steps and at the end
            log.step(row)
            if step == 1 and run.pair.prefix is not None and run.pair.prefix_misses:
                console.print("[yellow]note:[/] the system prompt doesn't render as the same leading tokens "
                              "for every prompt; the teacher runs full passes instead of reusing its prefix cache.")


def step_row(step: int, stats, grad_norm: float, seconds: dict[str, float], lr: float) -> dict:
    """The metrics.jsonl row of a finished step. "kl" is the method's training loss (reverse KL for opcd,
    forward KL for offpolicy, cross-entropy for sft: the bake's --method says which)."""
    total = sum(seconds.values())
    return {
        "step": step, "kl": round(stats.loss, 6), "response_tokens": stats.tokens,
        "tokens_per_s": round(stats.rollout_tokens / seconds["rollout"], 2), "grad_norm": round(grad_norm, 6),
        "rollout_s": round(seconds["rollout"], 3), "teacher_s": round(seconds.get("teacher", 0.0), 3),
        "student_s": round(seconds["student"], 3), "optim_s": round(seconds["optim"], 3), "step_s": round(total, 3),
        "lr": lr,
    }


def heldout_kl(run: Run, heldout: list[Messages], cfg: DistillConfig, console: Console, when: str) -> float:
    """Mean per-token KL(student || teacher) on student samples of the held-out prompts, fixed seed."""
    import torch

    gen = torch.Generator(run.device).manual_seed(step_seed(cfg.seed, 0) + 17)
    total, tokens = 0.0, 0
    with console.status(f"held-out KL {when} training ({len(heldout)} prompts)"):
        for i in range(0, len(heldout), cfg.batch_size):
            ro = run.pair.rollout(heldout[i : i + cfg.batch_size], gen)
            kl = run.pair.reverse_kl(ro)
            total, tokens = total + kl.sum().item(), tokens + kl.numel()
    value = total / max(tokens, 1)
    console.print(f"held-out reverse KL per token {when} training: {value:.4f} ({tokens} tokens)")
    return value


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
