"""Distillation losses, as functions of logits and hidden states.

All are pure except `backward_in_chunks`, which runs the backward through the LM
head chunk by chunk (the one place a training step's gradient starts).

Shapes: B batch, T positions, N response tokens (flattened), V vocabulary, H hidden.
Log-softmax is always taken in float32, whatever the model's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch


def row_sums(per_token: torch.Tensor, lengths: list[int]) -> list[float]:
    """Each response's sum of a flattened (N,) per-token tensor, in float64: one device read, not one per row."""
    return torch.stack([row.sum() for row in per_token.double().split(lengths)]).tolist()


def token_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """KL(student || teacher) at each position.

    Args:
        student_logits: (..., V), may carry gradient.
        teacher_logits: (..., V), treated as a constant.
        topk: 0 sums over the whole vocabulary (exact). K > 0: the KL between the two
            distributions coarsened to the student's K most likely tokens and one bucket for
            all the others (`coarse_kl`).
    Returns:
        (...,) float32 per-position KL.
    """
    if not topk or topk >= student_logits.shape[-1]:
        return _ExactReverseKL.apply(student_logits, teacher_logits.detach())
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.detach().float().log_softmax(-1)
    return coarse_kl(log_s, log_t, log_s.topk(topk, dim=-1).indices)


def coarse_kl(log_p: torch.Tensor, log_q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the tokens idx (..., K) plus one bucket holding the rest of each distribution.

    The OPCD reference code sums p log(p / q) over the top-K tokens alone. That partial sum is not a
    divergence: it goes negative when the student spreads its mass beyond its top K, and minimising
    it did exactly that (a french bake with --kl-topk 256 ended with a held-out "KL" of -0.11 and
    answers of word salad; docs/defaults.md, seventh pass). With the tail bucket the sum is the KL of
    two real distributions over K + 1 outcomes: never negative, never above the exact KL, and zero
    only where p and q agree on each of the K tokens and on the rest as a whole.
    """
    tail_p = log_p.scatter(-1, idx, float("-inf")).logsumexp(-1)  # log of p's mass outside idx
    tail_q = log_q.scatter(-1, idx, float("-inf")).logsumexp(-1)
    log_p, log_q = log_p.gather(-1, idx), log_q.gather(-1, idx)
    return (log_p.exp() * (log_p - log_q)).sum(-1) + tail_p.exp() * (tail_p - tail_q)


class _ExactReverseKL(torch.autograd.Function):
    """Full-vocabulary KL(s || t) with a hand-written gradient, to keep few (n, V) tensors alive.

    Autograd through log_softmax, exp, subtract and multiply would save four (n, V) tensors;
    this saves two (log p_s and log p_s - log p_t) and reuses buffers in place.
    d KL / d z_j = p_j * (log p_j - log q_j - KL), with z the student's logits.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits):
        log_s = student_logits.float().log_softmax(-1)  # (..., V)
        diff = teacher_logits.float().log_softmax(-1).neg_().add_(log_s)  # log p_s - log p_t, in place
        kl = torch.einsum("...v,...v->...", log_s.exp(), diff)  # (...,), no (..., V) product temporary
        ctx.save_for_backward(log_s, diff, kl)
        ctx.dtype = student_logits.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        log_s, diff, kl = ctx.saved_tensors
        grad = log_s.exp_().mul_(diff.sub_(kl.unsqueeze(-1))).mul_(grad_kl.unsqueeze(-1))  # saved buffers reused
        return grad.to(ctx.dtype), None


def token_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """KL(teacher || student) at each position: the off-policy baseline's loss on teacher samples.

    Args:
        student_logits: (..., V), may carry gradient.
        teacher_logits: (..., V), treated as a constant.
        topk: 0 sums over the whole vocabulary (exact). K > 0: the KL between the two
            distributions coarsened to the teacher's K most likely tokens and one bucket for the
            others (the mirror image of `token_reverse_kl`'s top-K; see `coarse_kl`).
    Returns:
        (...,) float32 per-position KL.
    """
    if not topk or topk >= student_logits.shape[-1]:
        return _ExactForwardKL.apply(student_logits, teacher_logits.detach())
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.detach().float().log_softmax(-1)
    return coarse_kl(log_t, log_s, log_t.topk(topk, dim=-1).indices)


class _ExactForwardKL(torch.autograd.Function):
    """Full-vocabulary KL(t || s) with a hand-written gradient that keeps one (n, V) tensor alive.

    d KL / d z_j = p_s,j - p_t,j, with z the student's logits: the forward saves exactly that
    difference and nothing else (autograd would keep log p_s, p_t and the product).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits):
        log_s = student_logits.float().log_softmax(-1)  # (..., V)
        log_t = teacher_logits.float().log_softmax(-1)  # (..., V)
        p_t = log_t.exp()
        kl = torch.einsum("...v,...v->...", p_t, log_t.sub_(log_s))  # (...,); log_t now holds log p_t - log p_s
        del log_t
        ctx.save_for_backward(log_s.exp_().sub_(p_t))  # p_s - p_t, in log_s's buffer
        ctx.dtype = student_logits.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        (diff,) = ctx.saved_tensors
        return diff.mul_(grad_kl.unsqueeze(-1)).to(ctx.dtype), None


def token_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p_s(target) at each position: the SFT baseline's loss on the teacher's sampled tokens.

    Args:
        student_logits: (..., V), may carry gradient.
        targets: (...,) token ids.
    Returns:
        (...,) float32 per-position cross-entropy.
    """
    import torch.nn.functional as F

    flat = student_logits.float().reshape(-1, student_logits.shape[-1])  # (n, V)
    return F.cross_entropy(flat, targets.reshape(-1), reduction="none").reshape(targets.shape)


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def forward_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, topk: int = 0
) -> torch.Tensor:
    """Token-mean forward KL(teacher || student) over the unmasked positions; shapes as `reverse_kl_loss`."""
    return _masked_mean(token_forward_kl(student_logits, teacher_logits, topk), mask)


def cross_entropy_loss(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over the unmasked positions.

    Args:
        student_logits: (B, T, V); targets: (B, T) ids; mask: (B, T) bool (padding False).
    """
    return _masked_mean(token_cross_entropy(student_logits, targets), mask)


def reverse_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, topk: int = 0
) -> torch.Tensor:
    """Token-mean reverse KL over the unmasked positions.

    Args:
        student_logits, teacher_logits: (B, T, V).
        mask: (B, T) bool, True at real response tokens (padding and post-EOS False).
    Returns:
        scalar; 0 when nothing is unmasked.
    """
    return _masked_mean(token_reverse_kl(student_logits, teacher_logits, topk), mask)  # (B, T) -> scalar


def chunked_kl(
    p_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    p_head: Callable[[torch.Tensor], torch.Tensor],
    q_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_size: int,
    topk: int = 0,
) -> torch.Tensor:
    """(N,) per-token KL(p || q) from final hidden states, no gradient.

    Only (chunk_size, V) logits exist at once for each model, instead of (N, V).

    Args:
        p_hidden, q_hidden: (N, H) hidden states predicting the same N response tokens
            (p is the distribution they were sampled from: the student for reverse KL).
        p_head, q_head: (n, H) -> (n, V) logits.
        topk: as in `token_reverse_kl` (over p's top-K tokens).
    """
    out = []
    with torch.no_grad():
        for i in range(0, p_hidden.shape[0], chunk_size):
            out.append(token_reverse_kl(p_head(p_hidden[i : i + chunk_size]), q_head(q_hidden[i : i + chunk_size]), topk))
    return torch.cat(out) if out else p_hidden.new_zeros(0, dtype=torch.float32)


def backward_in_chunks(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    token_loss: Callable[[torch.Tensor, slice], torch.Tensor],
    *,
    chunk_size: int,
    scale: float,
) -> torch.Tensor:
    """Backpropagate `scale * sum(loss)` through the LM head, `chunk_size` tokens at a time.

    Not a pure function: this is where a training step's gradient starts. Each chunk's
    (n, V) logits are freed right after its own backward, so peak memory is one chunk's.
    The gradient lands in `hidden.grad` (make `hidden` a detached leaf that requires grad,
    then send `hidden.grad` on through the decoder) and in any trainable head weights.

    Args:
        hidden: (N, H) leaf tensor with requires_grad.
        head: (n, H) -> (n, V) logits, with gradient.
        token_loss: (logits (n, V), rows: slice of the N tokens) -> (n,) per-token loss.
    Returns:
        (N,) float32 per-token loss, detached.
    """
    out = []
    for i in range(0, hidden.shape[0], chunk_size):
        rows = slice(i, i + chunk_size)
        loss = token_loss(head(hidden[rows]), rows)  # (n,)
        (loss.sum() * scale).backward()
        out.append(loss.detach())
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
