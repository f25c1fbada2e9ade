"""Losses against a float64 reference on random logits."""

import pytest
import torch

from promptbake.losses import backward_in_chunks, chunked_kl, reverse_kl_loss, token_forward_kl, token_reverse_kl


def reference_reverse_kl(s, t, mask):
    """Naive: full float64 log-softmax of both, KL(s||t) per position, masked token-mean."""
    log_s = s.double().log_softmax(-1)
    log_t = t.double().log_softmax(-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    m = mask.double()
    return (kl * m).sum() / m.sum()


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 101
    s = torch.randn(B, T, V, generator=g) * 3
    t = torch.randn(B, T, V, generator=g) * 3
    mask = torch.rand(B, T, generator=g) > 0.3
    return s, t, mask


def test_value_and_gradient_match_reference(logits):
    s, t, mask = logits
    s1 = s.clone().requires_grad_(True)
    s2 = s.double().clone().requires_grad_(True)
    loss = reverse_kl_loss(s1, t, mask)
    ref = reference_reverse_kl(s2, t, mask)
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(s1.grad.double(), s2.grad, atol=1e-6)


def test_masked_positions_contribute_nothing(logits):
    s, t, mask = logits
    s1 = s.clone().requires_grad_(True)
    loss = reverse_kl_loss(s1, t, mask)
    loss.backward()
    assert torch.all(s1.grad[~mask] == 0)
    # Changing logits at masked positions leaves the loss unchanged.
    s_changed = s.clone()
    s_changed[~mask] = torch.randn_like(s_changed[~mask]) * 10
    assert reverse_kl_loss(s_changed, t, mask).item() == pytest.approx(loss.item(), abs=1e-7)


def test_all_masked_is_zero(logits):
    s, t, mask = logits
    assert reverse_kl_loss(s, t, torch.zeros_like(mask)).item() == 0.0


def test_zero_when_teacher_equals_student(logits):
    s, _, mask = logits
    assert reverse_kl_loss(s, s.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    # A constant shift of the logits is the same distribution.
    assert reverse_kl_loss(s, s + 5.0, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_topk_matches_hand_computation():
    s = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    t = torch.tensor([[0.0, 1.0, 2.0, 0.5, 0.0]])
    p_s, p_t = s.softmax(-1)[0], t.softmax(-1)[0]
    # Student's top-2 tokens are 0 and 1; tokens 2-4 are one bucket.
    hand = sum(p_s[i] * (p_s[i].log() - p_t[i].log()) for i in (0, 1))
    rest_s, rest_t = p_s[2:].sum(), p_t[2:].sum()
    hand = hand + rest_s * (rest_s.log() - rest_t.log())
    assert token_reverse_kl(s, t, topk=2).item() == pytest.approx(hand.item(), abs=1e-6)
    # k = V is the exact sum.
    assert token_reverse_kl(s, t, topk=5).item() == pytest.approx(token_reverse_kl(s, t).item(), abs=1e-6)


def test_forward_kl_matches_reference(logits):
    s, t, _ = logits
    log_s, log_t = s.double().log_softmax(-1), t.double().log_softmax(-1)
    ref = (log_t.exp() * (log_t - log_s)).sum(-1)
    assert torch.allclose(token_forward_kl(s, t).double(), ref, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
@pytest.mark.parametrize("topk", [0, 7])
def test_chunked_equals_unchunked(chunk, topk):
    g = torch.Generator().manual_seed(1)
    N, H, V = 37, 16, 53
    head_s = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    head_t = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    hs = torch.randn(N, H, generator=g, requires_grad=True)
    ht = torch.randn(N, H, generator=g)

    # Plain: all logits at once, token-mean, autograd.
    plain = token_reverse_kl(head_s(hs), head_t(ht), topk)
    plain.mean().backward()
    grad_plain = hs.grad.clone()
    hs.grad = None

    # Chunked, with the gradient pushed through the hidden states chunk by chunk.
    x = hs * 1.0  # a non-leaf, like the model's output
    leaf = x.detach().requires_grad_(True)
    per_token = backward_in_chunks(leaf, head_s, lambda s, rows: token_reverse_kl(s, head_t(ht[rows]), topk),
                                   chunk_size=chunk, scale=1.0 / N)
    x.backward(leaf.grad)  # on through the "model", as the training step does
    assert torch.allclose(per_token, plain.detach(), atol=1e-6)
    assert torch.allclose(hs.grad, grad_plain, atol=1e-6)

    # The no-gradient version gives the same values.
    no_grad = chunked_kl(hs, ht, head_s, head_t, chunk_size=chunk, topk=topk)
    assert torch.allclose(no_grad, plain.detach(), atol=1e-6)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_topk_kl_is_a_divergence_bounded_by_the_exact_one(direction):
    """Coarsened to the top K tokens and one bucket for the rest, the KL stays a divergence: >= 0 and
    <= the exact KL (the partial sum alone went negative, and a bake minimising it collapsed). Its value
    and gradient match a float64 computation on the explicitly coarsened distributions."""
    from promptbake.losses import token_forward_kl

    torch.manual_seed(0)
    s = (torch.randn(6, 40) * 3).requires_grad_(True)
    t = torch.randn(6, 40) * 3
    kl = token_reverse_kl if direction == "reverse" else token_forward_kl
    # A flat and a sharp copy of one ranking: the sharp side puts more mass on the flat side's top K
    # than the flat side does, which drives the bare partial sum below zero.
    flat, sharp = s.detach() * 0.1, s.detach() * 3
    for student, teacher in ((s.detach(), t), (flat, sharp), (sharp, flat)):
        for k in (1, 4, 39):
            coarse = kl(student, teacher, topk=k)
            assert (coarse >= -1e-6).all() and (coarse <= kl(student, teacher) + 1e-5).all()

    def reference(logits):
        log_s, log_t = logits.double().log_softmax(-1), t.double().log_softmax(-1)
        sampler = log_s if direction == "reverse" else log_t
        idx = sampler.topk(4, dim=-1).indices
        keep = torch.zeros_like(log_s, dtype=torch.bool).scatter(-1, idx, True)

        def coarsen(log_p):
            p = log_p.exp()
            return torch.cat([p.gather(-1, idx), (p * ~keep).sum(-1, keepdim=True)], -1)

        cs, ct = coarsen(log_s), coarsen(log_t)
        p, q = (cs, ct) if direction == "reverse" else (ct, cs)
        return (p * (p.log() - q.log())).sum(-1)

    s64 = s.detach().double().requires_grad_(True)
    ref = reference(s64)
    ref.sum().backward()
    mine = kl(s, t, topk=4)
    mine.sum().backward()
    assert torch.allclose(mine.double(), ref.detach(), atol=1e-5)
    assert torch.allclose(s.grad.double(), s64.grad, atol=1e-5)
