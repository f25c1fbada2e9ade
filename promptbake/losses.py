"""Distillation losses: pure functions of logits and hidden states.

Shapes: B batch, T positions, N response tokens (flattened), V vocabulary, H hidden.
Log-softmax is always taken in float32, whatever the model's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch


def token_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """KL(student || teacher) at each position.

    Args:
        student_logits: (..., V), may carry gradient.
        teacher_logits: (..., V), treated as a constant.
        topk: 0 sums over the whole vocabulary (exact). K > 0 sums over the student's
            K most likely tokens without renormalising, as the OPCD reference code does.
    Returns:
        (...,) float32 per-position KL.
    """
    if not topk:
        return _ExactReverseKL.apply(student_logits, teacher_logits.detach())
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.detach().float().log_softmax(-1)
    idx = log_s.topk(topk, dim=-1).indices
    log_s, log_t = log_s.gather(-1, idx), log_t.gather(-1, idx)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


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


def token_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at each position, (..., V) -> (...,), exact over the vocabulary."""
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.detach().float().log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


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
    kl = token_reverse_kl(student_logits, teacher_logits, topk)  # (B, T)
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def chunked_reverse_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_size: int,
    topk: int = 0,
    backward_scale: float | None = None,
) -> torch.Tensor:
    """Per-token reverse KL from final hidden states, `chunk_size` tokens through the LM head at a time.

    Only (chunk_size, V) logits exist at once for each model, instead of (N, V).
    With `backward_scale` set, the gradient of `backward_scale * sum(KL)` is pushed
    into `student_hidden` chunk by chunk (each chunk's logits are freed after its
    backward), and the caller finishes with nothing more to do: the returned
    values are detached either way.

    Args:
        student_hidden: (N, H) hidden states at the positions that predict response tokens.
        teacher_hidden: (N, H), same token order, no gradient.
        student_head / teacher_head: (n, H) -> (n, V) logits.
    Returns:
        (N,) float32 per-token KL, detached.
    """
    out = []
    if backward_scale is None:
        with torch.no_grad():
            for i in range(0, student_hidden.shape[0], chunk_size):
                s = student_head(student_hidden[i : i + chunk_size])
                t = teacher_head(teacher_hidden[i : i + chunk_size])
                out.append(token_reverse_kl(s, t, topk))
        return torch.cat(out) if out else student_hidden.new_zeros(0, dtype=torch.float32)

    # Cut the graph at the hidden states so each chunk's backward stops there and frees
    # its logits; the accumulated gradient is then sent through the model once.
    leaf = student_hidden.detach().requires_grad_(True)
    for i in range(0, leaf.shape[0], chunk_size):
        with torch.no_grad():
            t = teacher_head(teacher_hidden[i : i + chunk_size])
        kl = token_reverse_kl(student_head(leaf[i : i + chunk_size]), t, topk)  # (n,)
        del t  # free the teacher's (n, V) logits before the backward allocates its own
        (kl.sum() * backward_scale).backward()
        out.append(kl.detach())
    if leaf.grad is not None and student_hidden.requires_grad:
        student_hidden.backward(leaf.grad)
    return torch.cat(out) if out else student_hidden.new_zeros(0, dtype=torch.float32)
