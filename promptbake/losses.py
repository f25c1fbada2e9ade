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
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.detach().float().log_softmax(-1)
    if topk:
        idx = log_s.topk(topk, dim=-1).indices
        log_s, log_t = log_s.gather(-1, idx), log_t.gather(-1, idx)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


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
        (kl.sum() * backward_scale).backward()
        out.append(kl.detach())
    if leaf.grad is not None and student_hidden.requires_grad:
        student_hidden.backward(leaf.grad)
    return torch.cat(out) if out else student_hidden.new_zeros(0, dtype=torch.float32)
