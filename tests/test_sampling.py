"""Fast and plain samplers: same tokens when greedy, same distribution when sampling, EOS handled alike."""

import pytest
import torch

import tiny
from conftest import PIRATE
from promptbake.decoder import LeanDecoder
from promptbake.sampling import RolloutModel, left_pad, pick_tokens, sample, sample_with_generate

PROMPTS = [[{"role": "user", "content": t}] for t in ("Why is the sky blue?", "Write a poem.", "Hola", "Sort a list")]


@pytest.fixture(scope="module")
def pair(tiny_dir):
    p = tiny.load_pair(tiny_dir, PIRATE, lora_init_std=0.05)
    p.sampler_model = RolloutModel(p.student, torch.float32)  # same precision as the others, for exact parity
    return p


def _ids(pair):
    return [pair.renderer.student_ids(m) for m in PROMPTS]


def _kw(pair, **over):
    kw = dict(pair.sampling.kwargs(), max_new_tokens=10, temperature=0.0)
    kw.update(over)
    return kw


def test_greedy_tokens_identical_across_samplers(pair):
    ids = _ids(pair)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    via_generate = sample_with_generate(pair.student, ids, generator=g(), **_kw(pair))
    exact = sample(pair.student, ids, generator=g(), **_kw(pair))
    pair.sampler_model.refresh()
    assert isinstance(pair.sampler_model.model, LeanDecoder)
    fast = sample(pair.sampler_model.model, ids, generator=g(), **_kw(pair))
    merged_hf = RolloutModel(pair.student, torch.float32, lean=False)
    assert not isinstance(merged_hf.model, LeanDecoder)
    fast_hf = sample(merged_hf.model, ids, generator=g(), **_kw(pair))
    assert exact == via_generate
    assert fast == via_generate
    assert fast_hf == via_generate


def test_eos_cut_and_early_stop_match_generate(pair):
    ids = _ids(pair)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    free = sample(pair.student, ids, generator=g(), **_kw(pair, eos_ids=[-1]))
    eos = free[0][2]  # make a token row 0 emits third into "EOS"
    got = sample(pair.student, ids, generator=g(), **_kw(pair, eos_ids=[eos]))
    ref = sample_with_generate(pair.student, ids, generator=g(), **_kw(pair, eos_ids=[eos]))
    assert got == ref
    assert got[0] == free[0][:3]
    for row, full in zip(got, free):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]  # ends at (and keeps) the first EOS, nothing after


def test_rollout_model_tracks_adapter_updates(pair):
    with torch.no_grad():
        for name, p in pair.student.named_parameters():
            if "lora_A" in name:
                p.add_(0.01)
    ids, mask = left_pad(_ids(pair), pair.tok.pad_token_id, "cpu")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    merged_hf = RolloutModel(pair.student, torch.float32, lean=False)
    pair.sampler_model.refresh()
    with torch.no_grad():
        want = pair.student(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        lean = pair.sampler_model.model.start(ids, mask, 1)
        hf = merged_hf.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    assert torch.allclose(lean, want, atol=1e-5)
    assert torch.allclose(hf, want, atol=1e-5)


def test_pick_tokens_matches_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -4.0]]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.7):
        p = (logits[0] / temperature).softmax(-1)
        draws = pick_tokens(logits, temperature, 1.0, g)
        freq = torch.bincount(draws, minlength=6).float() / len(draws)
        assert torch.allclose(freq, p, atol=0.01)
    # top_p = 0.8: keep the most likely tokens until their mass reaches 0.8, renormalise.
    p = logits[0].softmax(-1)
    keep = (p.cumsum(0) - p) < 0.8
    q = torch.where(keep, p, 0.0)
    q = q / q.sum()
    draws = pick_tokens(logits, 1.0, 0.8, g)
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    assert torch.allclose(freq, q, atol=0.01)
    assert freq[~keep].sum() == 0
    assert torch.equal(pick_tokens(logits[:2], 0.0, 1.0, g), torch.tensor([0, 0]))


def test_pick_tokens_never_draws_a_zero_probability_token():
    logits = torch.full((20000, 7), float("-inf"))
    logits[:, 3] = 0.0
    logits[::2, 0] = 0.0  # even rows: tokens 0 and 3 at 1/2 each, the first and an inner entry
    logits[1::2, 6] = 0.0  # odd rows: 3 and 6, the last entry
    g = torch.Generator().manual_seed(0)
    for top_p in (1.0, 0.9):
        draws = pick_tokens(logits, 1.0, top_p, g)
        assert set(draws[::2].tolist()) == {0, 3} and set(draws[1::2].tolist()) == {3, 6}
        assert abs((draws[::2] == 0).float().mean().item() - 0.5) < 0.02


def test_fast_and_generate_sample_the_same_distribution(tiny_dir):
    """First-token frequencies of both samplers agree with the model's exact probabilities."""
    pair = tiny.load_pair(tiny_dir, PIRATE, lora_init_std=0.05)
    with torch.no_grad():  # sharpen the random model's near-uniform output so frequencies are informative
        pair.student.get_base_model().lm_head.weight.mul_(150)
    pair.sampler_model = RolloutModel(pair.student, torch.float32)
    ids = [_ids(pair)[1]] * 3000
    with torch.no_grad():
        probs = pair.student(input_ids=torch.tensor(ids[:1])).logits[0, -1].softmax(-1)
    top = probs.topk(5).indices
    assert probs[top].sum() > 0.5  # a distribution worth testing
    kw = _kw(pair, max_new_tokens=1, temperature=1.0)
    for fn, model in ((sample, pair.sampler_model.model), (sample_with_generate, pair.student)):
        out = fn(model, ids, generator=torch.Generator().manual_seed(3), **kw)
        freq = torch.bincount(torch.tensor([r[0] for r in out]), minlength=probs.numel()).float() / len(out)
        assert torch.allclose(freq[top], probs[top], atol=0.03), (fn.__name__, freq[top], probs[top])


def test_pick_tokens_over_a_big_vocabulary_draws_across_blocks_exactly():
    """V = 2100 spans three 1024-token blocks (the last one partial): mass on block edges, zeros elsewhere."""
    V = 2100
    logits = torch.full((12000, V), float("-inf"))
    hot = torch.tensor([0, 1023, 1024, 2047, 2048, 2099])
    logits[:, hot] = torch.tensor([0.5, 1.0, -0.5, 0.0, 2.0, 1.5])
    p = logits[0].softmax(-1)[hot]
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        draws = pick_tokens(logits, temperature, 1.0, g)
        assert set(draws.tolist()) <= set(hot.tolist())  # never a zero-probability token
        freq = torch.bincount(draws, minlength=V).float()[hot] / len(draws)
        want = (logits[0, hot] / temperature).softmax(-1)
        assert torch.allclose(freq, want, atol=0.015), (temperature, freq, want)
    assert torch.allclose(p.sum(), torch.tensor(1.0))
    draws = pick_tokens(logits, 1.0, 0.5, g)  # top_p: the two most likely (2048, 2099) reach 0.5
    freq = torch.bincount(draws, minlength=V).float()[hot] / len(draws)
    keep = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool)
    want = torch.where(keep, p, 0.0) / p[keep].sum()
    assert torch.allclose(freq, want, atol=0.015)


def test_pick_tokens_on_nan_logits_returns_ids_in_range():
    """A diverged model's NaN logits must not crash the draw: the bake's finiteness checks stop it afterwards."""
    for V in (7, 2100):
        draws = pick_tokens(torch.full((3, V), float("nan")), 1.0, 1.0, torch.Generator().manual_seed(0))
        assert draws.shape == (3,) and bool(((draws >= 0) & (draws < V)).all())
