"""The baselines behind --method: their losses against float64 references, each method training,
the off-policy methods' samples coming from the prompted frozen teacher, and exact resume."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from conftest import PIRATE, SECRET
from promptbake.losses import (backward_in_chunks, cross_entropy_loss, forward_kl_loss, token_cross_entropy,
                               token_forward_kl)
from promptbake.methods import METHODS, PhaseTimer
from promptbake.pair import StudentTeacher
from test_resume import adapter_diff, bake_args, metrics, run, stop_at, work


# ---------------------------------------------------------------- the losses, against float64


def reference_forward_kl(s, t, mask):
    """Naive float64 KL(t || s) per position, masked token-mean."""
    log_s, log_t = s.double().log_softmax(-1), t.double().log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    m = mask.double()
    return (kl * m).sum() / m.sum()


def reference_cross_entropy(s, targets, mask):
    nll = -s.double().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    m = mask.double()
    return (nll * m).sum() / m.sum()


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 7, 101
    s = torch.randn(B, T, V, generator=g) * 3
    t = torch.randn(B, T, V, generator=g) * 3
    mask = torch.rand(B, T, generator=g) > 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    return s, t, mask, targets


def value_and_grad(fn, s):
    s = s.clone().requires_grad_(True)
    loss = fn(s)
    loss.backward()
    return loss.item(), s.grad


def test_forward_kl_value_and_gradient_match_float64(logits):
    s, t, mask, _ = logits
    value, grad = value_and_grad(lambda x: forward_kl_loss(x, t, mask), s)
    ref, ref_grad = value_and_grad(lambda x: reference_forward_kl(x, t, mask), s.double())
    assert value == pytest.approx(ref, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=0)
    assert torch.all(grad[~mask] == 0)  # masked positions get no gradient
    # ... and their logits don't change the loss.
    moved = s.clone()
    moved[~mask] = torch.randn_like(moved[~mask]) * 10
    assert forward_kl_loss(moved, t, mask).item() == pytest.approx(value, abs=1e-6)


def test_forward_kl_is_not_the_reverse_kl(logits):
    """A loss that confused the directions would still pass a reference written the same way:
    check the two directions really differ on these logits, and forward KL is 0 only at equality."""
    s, t, mask, _ = logits
    from promptbake.losses import reverse_kl_loss

    assert abs(forward_kl_loss(s, t, mask).item() - reverse_kl_loss(s, t, mask).item()) > 0.1
    assert forward_kl_loss(s, s + 2.0, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_forward_kl_topk_sums_over_the_teachers_top_tokens():
    s = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    t = torch.tensor([[0.0, 1.0, 2.0, 0.5, 0.0]])
    p_s, p_t = s.softmax(-1)[0], t.softmax(-1)[0]
    hand = sum(p_t[i] * (p_t[i].log() - p_s[i].log()) for i in (2, 1))  # the teacher's top-2: tokens 2 and 1
    rest_t, rest_s = p_t[[0, 3, 4]].sum(), p_s[[0, 3, 4]].sum()  # and the others as one bucket
    hand = hand + rest_t * (rest_t.log() - rest_s.log())
    assert token_forward_kl(s, t, topk=2).item() == pytest.approx(hand.item(), abs=1e-6)
    assert token_forward_kl(s, t, topk=5).item() == pytest.approx(token_forward_kl(s, t).item(), abs=1e-6)


def test_cross_entropy_value_and_gradient_match_float64(logits):
    s, _, mask, targets = logits
    value, grad = value_and_grad(lambda x: cross_entropy_loss(x, targets, mask), s)
    ref, ref_grad = value_and_grad(lambda x: reference_cross_entropy(x, targets, mask), s.double())
    assert value == pytest.approx(ref, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=0)
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("which", ["forward_kl", "forward_kl_top8", "cross_entropy"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_backward_equals_plain(which, chunk):
    """backward_in_chunks through a real head gives the plain loss's value and gradients, any chunk size."""
    g = torch.Generator().manual_seed(4)
    N, H, V = 23, 16, 50
    hidden = torch.randn(N, H, generator=g)
    head = torch.nn.Linear(H, V)
    teacher = torch.randn(N, V, generator=g) * 2
    targets = torch.randint(0, V, (N,), generator=g)
    token_loss = {
        "forward_kl": lambda logits, rows: token_forward_kl(logits, teacher[rows]),
        "forward_kl_top8": lambda logits, rows: token_forward_kl(logits, teacher[rows], topk=8),
        "cross_entropy": lambda logits, rows: token_cross_entropy(logits, targets[rows]),
    }[which]

    plain_h = hidden.clone().requires_grad_(True)
    plain = token_loss(head(plain_h), slice(None)).mean()
    plain.backward()
    plain_grads = (plain_h.grad.clone(), head.weight.grad.clone())
    head.zero_grad()

    leaf = hidden.clone().requires_grad_(True)
    per_token = backward_in_chunks(leaf, head, token_loss, chunk_size=chunk, scale=1.0 / N)
    assert per_token.shape == (N,)
    assert per_token.mean().item() == pytest.approx(plain.item(), abs=1e-6)
    torch.testing.assert_close(leaf.grad, plain_grads[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, plain_grads[1], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- each method trains


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_lowers_its_own_training_loss(tiny_model, method):
    """A few updates on one batch, re-drawn with the same seed each time, lower the method's own loss."""
    pair = tiny.load_pair(tiny_model, PIRATE, lora_init_std=0.05)  # a student away from the teacher
    batch = [[{"role": "user", "content": p}] for p in ("Say hello.", "What is a fox?", "Count to five.")]
    params = [p for p in pair.student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    m = METHODS[method](pair)
    losses = []
    for _ in range(12):
        pair.sampler.refresh()
        stats = m.step(batch, torch.Generator().manual_seed(0), PhaseTimer(torch.device("cpu")))
        losses.append(stats.loss)
        assert stats.tokens > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(method, [round(x, 4) for x in losses])
    # The KLs can reach 0; the cross-entropy only falls towards the teacher's entropy (~5 nats here).
    assert losses[-1] < 0.9 * losses[0]
    assert min(losses[-3:]) < min(losses[:3])


def distill_args(model, prompt_files, out, *extra):
    return bake_args(model, prompt_files, out, "--steps", "3", "--lr", "3e-3", *extra)


@pytest.mark.parametrize("method", ["offpolicy", "sft"])
def test_a_bake_records_its_method(tiny_model, prompt_files, tmp_path, method):
    out = tmp_path / "baked"
    result = run(distill_args(tiny_model, prompt_files, out, "--method", method))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "promptbake.json").read_text())
    assert record["method"] == method and record["settings"]["method"] == method
    assert f"--method {method}" in (out / "README.md").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["kl"] > 0 and r["response_tokens"] > 0 for r in rows)
    assert all(r["teacher_s"] == 0 for r in rows) == (method == "sft")  # sft needs no teacher scoring


def test_bad_method_is_one_error_line(tiny_model, prompt_files, tmp_path):
    result = run(distill_args(tiny_model, prompt_files, tmp_path / "baked", "--method", "dpo"))
    assert result.exit_code == 2
    assert "--method" in result.output and "opcd" in result.output and "offpolicy" in result.output
    assert not (tmp_path / "baked").exists() and not work(tmp_path / "baked").exists()


# ---------------------------------------------------------------- the teacher's samples


@pytest.mark.parametrize("method,rollout", [("offpolicy", "fast"), ("sft", "exact")])
def test_teacher_samples_come_from_the_prompted_frozen_teacher(tiny_model, prompt_files, tmp_path, monkeypatch,
                                                                method, rollout):
    """Every step's samples are what a freshly loaded base model (no adapter) draws from the
    system-prompted render with that step's seed, and the student trains on exactly those tokens
    with no system prompt -- at later steps too, when the student has moved away from the base."""
    from promptbake.models import load_model, load_tokenizer, resolve_model
    from promptbake.render import Renderer
    from promptbake.sampling import rollout_dtype, sample
    from promptbake.train import step_seed

    drawn, trained = [], []
    original_rollout, original_states = StudentTeacher.teacher_rollout, StudentTeacher.student_states

    def teacher_rollout(self, prompts, generator):
        ro = original_rollout(self, prompts, generator)
        drawn.append(ro)
        return ro

    def student_states(self, ro):
        trained.append((ro.student_ids, ro.responses))
        return original_states(self, ro)

    monkeypatch.setattr(StudentTeacher, "teacher_rollout", teacher_rollout)
    monkeypatch.setattr(StudentTeacher, "student_states", student_states)
    out = tmp_path / "baked"
    result = run(distill_args(tiny_model, prompt_files, out, "--method", method, "--rollout", rollout, "--no-eval"))
    assert result.exit_code == 0, result.output
    assert len(drawn) == 3 and len(trained) == 3

    src = resolve_model(str(tiny_model))
    tok = load_tokenizer(src)
    renderer = Renderer(tok, SECRET)
    plain = load_model(src, quant="none", device=torch.device("cpu"), dtype=torch.float32)  # no adapter at all
    if rollout == "fast":
        from promptbake.decoder import LeanDecoder

        plain = LeanDecoder(plain, rollout_dtype(torch.float32, torch.device("cpu")))
    eos = sorted({tok.eos_token_id, plain.config.eos_token_id} if hasattr(plain, "config") else {tok.eos_token_id})
    for step, ro in enumerate(drawn, start=1):
        texts = [tok.decode(ids) for ids in ro.teacher_ids]
        assert all(SECRET in t and t.startswith("<|im_start|>system\n") for t in texts)
        assert ro.teacher_ids == [renderer.teacher_ids(m) for m in ro.prompts]
        assert ro.student_ids == [renderer.student_ids(m) for m in ro.prompts]
        assert all(SECRET not in tok.decode(ids) for ids in ro.student_ids)
        gen = torch.Generator().manual_seed(step_seed(0, step))
        expected = sample(plain, ro.teacher_ids, max_new_tokens=8, temperature=1.0, top_p=1.0,
                          eos_ids=eos, pad_id=tok.pad_token_id, generator=gen)
        assert ro.responses == expected, f"step {step}"
        assert trained[step - 1] == (ro.student_ids, ro.responses)  # the student trains on exactly those tokens
    assert len({tuple(map(tuple, ro.responses)) for ro in drawn}) == 3  # fresh samples every step


# ---------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def offpolicy_reference(tiny_model, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("offref") / "baked"
    result = run(bake_args(tiny_model, prompt_files, out, "--method", "offpolicy"))
    assert result.exit_code == 0, result.output
    return out


def test_offpolicy_resume_matches_uninterrupted(tiny_model, prompt_files, offpolicy_reference, tmp_path,
                                                monkeypatch):
    out = tmp_path / "baked"
    stopped = stop_at(monkeypatch, tiny_model, prompt_files, out, 5, "--method", "offpolicy")
    assert "saved step 4" in stopped.output

    resumed = run(bake_args(tiny_model, prompt_files, out, "--method", "offpolicy"))
    assert resumed.exit_code == 0, resumed.output
    assert "resuming the stopped bake" in resumed.output
    diff = adapter_diff(offpolicy_reference, out)
    print(f"offpolicy: max abs adapter difference after resume {diff:.3g}")
    assert diff <= 1e-6
    assert metrics(out) == metrics(offpolicy_reference)


def test_resume_with_another_method_is_refused(tiny_model, prompt_files, tmp_path, monkeypatch):
    out = tmp_path / "baked"
    stop_at(monkeypatch, tiny_model, prompt_files, out, 3, "--method", "offpolicy")
    before = sorted(p.name for p in work(out).iterdir())
    for other, shown in (("sft", "sft"), (None, "opcd")):
        extra = ("--method", other) if other else ()
        refused = run(bake_args(tiny_model, prompt_files, out, *extra))
        assert refused.exit_code == 2
        assert refused.output.strip() == (
            f"error: {work(out)} holds a stopped bake with other settings: --method was offpolicy, now {shown}. "
            f"Resume with the same settings, or delete {work(out)} to start afresh.")
    assert sorted(p.name for p in work(out).iterdir()) == before  # refusals touch nothing
    assert not out.exists()
