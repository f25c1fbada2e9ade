"""The measurements of an evaluation: samples from each system, KL both ways, checks, drift."""

from __future__ import annotations

import time

from rich.console import Console

from ..checks import Check
from ..data import Messages, PromptSet
from ..models import context_length
from ..setup import fit_context
from .report import SYSTEMS, CheckRates
from .systems import ComparedModels


def measure(models: ComparedModels, prompts: list[Messages], ood: list[Messages], checks: list[Check], *, seed: int,
            console: Console) -> dict:
    """Sample the three systems on `prompts` (and the baked one on `ood`); return every figure of a report."""
    responses = {}
    for name in SYSTEMS:
        t0 = time.perf_counter()
        with console.status(f"sampling {name} on {len(prompts)} prompts"):
            responses[name] = models.sample(name, prompts, seed)
        n_tok = sum(len(r) for r in responses[name])
        console.print(f"sampled {name}: {len(prompts)} responses, {n_tok} tokens, {time.perf_counter() - t0:.0f} s")
    with console.status("scoring"):
        reverse = {s: models.kl(s, "teacher", prompts, responses[s]) for s in ("baked", "base")}
        forward = {s: models.kl("teacher", s, prompts, responses["teacher"]) for s in ("baked", "base")}
    texts = {s: models.text(responses[s]) for s in SYSTEMS}
    rates = [CheckRates(c, {s: sum(c.passes(t) for t in texts[s]) for s in SYSTEMS}, len(prompts)) for c in checks]
    drift = None
    if ood:
        with console.status(f"sampling baked on {len(ood)} drift prompts"):
            ood_responses = models.sample("baked", ood, seed)
            drift = models.kl("baked", "base", ood, ood_responses)
    samples = [{"prompt": m[-1]["content"], **{s: texts[s][i] for s in SYSTEMS}} for i, m in enumerate(prompts)]
    return dict(reverse_kl=reverse, forward_kl=forward, checks=rates, drift=drift, samples=samples)



def fit_prompts(prompts: list[Messages], models: ComparedModels, max_new: int, console: Console) -> list[Messages]:
    """The prompts that fit the model's context with the system prompt and a full response (notes the others)."""
    kept = fit_context(PromptSet("eval", prompts, len(prompts)), models.renderer,
                       context_length(models.base_lm.config), max_new)
    if kept.dropped:
        console.print(f"[yellow]note:[/] dropped {kept.drop_summary()} prompt(s).")
    return kept.prompts

