"""Training methods: what one optimizer step computes on a fresh batch of prompts.

A method turns a batch into gradients on the LoRA weights and says what it measured;
the loop (train.py) owns everything else: batches, seeds, clipping, the optimizer
update, checkpoints and the step log. A new method is one class with a `step` here
and a line in `METHODS`.

    opcd       student samples (no system prompt); reverse KL(student || teacher) on them
               (--teacher-rollouts: a share of the batch sampled by the prompted teacher instead)
    offpolicy  prompted teacher samples; forward KL(teacher || student) on them
    sft        prompted teacher samples; cross-entropy of the student on the sampled tokens

Every method's student pass goes through `student_backward`, the one place the
student's forward and backward run.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from .data import Messages
from .losses import backward_in_chunks, token_cross_entropy, token_forward_kl, token_reverse_kl
from .pair import Rollout, StudentTeacher


@dataclass
class StepStats:
    loss: float  # the method's token-mean loss on this batch (its `loss_name`)
    tokens: int  # response tokens trained on
    rollout_tokens: int  # tokens sampled this step (the tokens/s figure)


class PhaseTimer:
    """Seconds per phase of a step. On CUDA it synchronises before each reading: kernels run
    asynchronously, so an unsynchronised clock charges one phase's work to the next."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


class OPCD:
    """On-policy context distillation: the student samples without the system prompt, the
    prompted teacher scores those tokens, and the loss is the exact reverse KL(student || teacher)."""

    name = "opcd"
    loss_name = "reverse KL"

    def __init__(self, pair: StudentTeacher, teacher_share: float = 0.0):
        self.pair = pair
        self.teacher_share = teacher_share  # --teacher-rollouts

    def teacher_rows(self, batch_size: int) -> int:
        """How many of a batch's rollouts the prompted teacher samples (the last ones)."""
        return round(self.teacher_share * batch_size)

    def step(self, batch: list[Messages], generator: torch.Generator, timer: PhaseTimer) -> StepStats:
        k = self.teacher_rows(len(batch))
        own, lent = (batch[:-k], batch[-k:]) if k else (batch, [])
        with timer("rollout"):
            parts = [self.pair.rollout(own, generator)] if own else []  # student samples, no system prompt
            if lent:  # prompted teacher samples from the frozen weights, drawn after the student's
                parts.append(self.pair.teacher_rollout(lent, generator))
            ro = Rollout.join(parts)
        with timer("teacher"):
            t_hidden = self.pair.teacher_states(ro)  # (N, H), prompted teacher, no grad
        with timer("student"):
            kl = self.backward(ro, t_hidden)  # (N,)
        return StepStats(loss=kl.mean().item(), tokens=ro.n_tokens, rollout_tokens=ro.n_tokens)

    def backward(self, ro: Rollout, t_hidden: torch.Tensor) -> torch.Tensor:
        """Per-token reverse KL on the rollout; the gradient of its token-mean lands in the LoRA weights."""
        pair = self.pair
        return student_backward(
            pair, ro,
            lambda logits, rows: token_reverse_kl(logits, _no_grad(pair.teacher_head, t_hidden[rows]), pair.kl_topk),
            scale=1.0 / max(ro.n_tokens, 1),
        )


class OffPolicy:
    """Off-policy context distillation (the Prompt Baking baseline): the prompted teacher samples,
    and the student learns the exact forward KL(teacher || student) at those tokens."""

    name = "offpolicy"
    loss_name = "forward KL"

    def __init__(self, pair: StudentTeacher):
        self.pair = pair

    def step(self, batch: list[Messages], generator: torch.Generator, timer: PhaseTimer) -> StepStats:
        pair = self.pair
        with timer("rollout"):
            ro = pair.teacher_rollout(batch, generator)  # prompted teacher samples, frozen weights
        with timer("teacher"):
            t_hidden = pair.teacher_states(ro)  # (N, H), no grad, prefix cache as in OPCD
        with timer("student"):
            kl = student_backward(
                pair, ro,
                lambda logits, rows: token_forward_kl(logits, _no_grad(pair.teacher_head, t_hidden[rows]),
                                                      pair.kl_topk),
            )  # (N,)
        return StepStats(loss=kl.mean().item(), tokens=ro.n_tokens, rollout_tokens=ro.n_tokens)


class SFT:
    """Supervised fine-tuning on the prompted teacher's answers: cross-entropy of the student
    (no system prompt) on the tokens the teacher sampled. Needs no teacher forward pass."""

    name = "sft"
    loss_name = "cross-entropy"

    def __init__(self, pair: StudentTeacher):
        self.pair = pair

    def step(self, batch: list[Messages], generator: torch.Generator, timer: PhaseTimer) -> StepStats:
        pair = self.pair
        with timer("rollout"):
            ro = pair.teacher_rollout(batch, generator)
        targets = torch.tensor([t for r in ro.responses for t in r], dtype=torch.long,
                               device=pair.student.device)  # (N,), in the token order of the hidden states
        with timer("student"):
            ce = student_backward(pair, ro, lambda logits, rows: token_cross_entropy(logits, targets[rows]))  # (N,)
        return StepStats(loss=ce.mean().item(), tokens=ro.n_tokens, rollout_tokens=ro.n_tokens)


def student_backward(pair: StudentTeacher, ro: Rollout, token_loss: Callable[[torch.Tensor, slice], torch.Tensor],
                     *, scale: float | None = None) -> torch.Tensor:
    """The student's forward and backward for every method: backpropagate `scale * sum(token_loss)` over
    the rollout's N response tokens into the LoRA weights (scale: 1 / N by default, the token-mean).

    token_loss(student logits (n, V), rows: slice of the N tokens) -> (n,) per-token loss.
    The student pass and its backward run `pair.micro_batch_size` rollouts at a time (all at once
    when None): gradients add up in the LoRA weights and `scale` is the whole batch's, so the
    optimizer sees the same gradient as from one pass. Returns the (N,) per-token loss, detached.
    """
    scale = 1.0 / max(ro.n_tokens, 1) if scale is None else scale
    out, start = [], 0
    for part in ro.split(pair.micro_batch_size):
        s_hidden = pair.student_states(part)  # (n, H), graph through the LoRA weights
        leaf = s_hidden.detach().requires_grad_(True)  # cut here: the head and loss run in chunks
        out.append(backward_in_chunks(leaf, pair.student_head, _rows_from(token_loss, start, part.n_tokens),
                                      chunk_size=pair.chunk_size, scale=scale))
        if leaf.grad is not None and s_hidden.requires_grad:
            s_hidden.backward(leaf.grad)  # the rest of the backward: through the decoder into the LoRA weights
        start += part.n_tokens
    return torch.cat(out)


def _rows_from(token_loss, start: int, n: int):
    """token_loss for a part whose n tokens are rows start .. start + n of the whole batch."""
    return lambda logits, rows: token_loss(logits, slice(start + rows.start, start + min(rows.stop, n)))


def _no_grad(head, hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return head(hidden)


METHODS = {m.name: m for m in (OPCD, OffPolicy, SFT)}


def make_method(cfg, pair: StudentTeacher):
    """The --method of a DistillConfig, on this pair."""
    if cfg.method == "opcd":
        return OPCD(pair, teacher_share=cfg.teacher_rollouts)
    return METHODS[cfg.method](pair)
