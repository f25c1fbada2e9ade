"""`evaluate`: a baked checkpoint against the prompted teacher and the base, with gates and a report.

All three answer the same prompts with the same sampling seed. The report holds
fidelity (per-token KL to the teacher, and the share of the base's gap the bake
closed), behaviour-check pass rates, drift on unrelated prompts (KL(baked || base)),
and a few answers side by side. `distill` runs a short version at the end of a bake
(`evaluate_bake`).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..checks import Check, checks_for
from ..config import DistillConfig, EvalConfig
from ..data import Messages, load_prompts, read_system_prompt, sha256_text, spread
from ..errors import note
from .measure import fit_prompts, measure
from .report import EvalReport, apply_gates, print_report, write_report
from .systems import load_compared

DISTILL_EVAL_PROMPTS = 16  # the short evaluation at the end of `distill`


def evaluate(cfg: EvalConfig, console: Console | None = None) -> EvalReport:
    """Compare baked, teacher and base on cfg.prompts; write cfg.report if set. Gates are in report.gates."""
    console = console or Console(stderr=True)
    cfg.validate()
    system = read_system_prompt(cfg.prompt)
    checks = checks_for(cfg.checks, cfg.prompt, cfg.min_pass_rate)
    prompts = spread(load_prompts(cfg.prompts), cfg.max_prompts)
    ood = spread(load_prompts(cfg.ood), cfg.max_prompts)
    if not checks:
        note(console, f"no checks file; pass --checks FILE or put {Path(cfg.prompt).stem}.checks.toml beside "
                      f"{cfg.prompt} to measure behaviour.")

    models = load_compared(cfg.baked, cfg.model, system, **_loading(cfg), force=cfg.force, console=console)
    prompts = fit_prompts(prompts, models, cfg.max_new_tokens, console)
    ood = fit_prompts(ood, models, cfg.max_new_tokens, console)
    figures = measure(models, prompts, ood, checks, seed=cfg.seed, console=console)
    report = EvalReport(str(cfg.baked), cfg.model, sha256_text(system), **figures, settings=cfg.to_record())
    report.gates = apply_gates(report, min_gap_closed=cfg.min_gap_closed, min_pass_rate=cfg.min_pass_rate,
                               max_drift=cfg.max_drift)
    if cfg.report is not None:
        write_report(report, Path(cfg.report), Path(cfg.baked) / "metrics.jsonl", console)
    return report


def evaluate_bake(cfg: DistillConfig, folder: Path, heldout: list[Messages], checks: list[Check],
                  console: Console) -> EvalReport:
    """The short evaluation `distill` runs on its merged checkpoint: up to 16 held-out prompts, no drift."""
    console.print(f"evaluating the merged checkpoint on {min(len(heldout), DISTILL_EVAL_PROMPTS)} held-out prompts")
    system = read_system_prompt(cfg.prompt)
    models = load_compared(folder, cfg.model, system, **_loading(cfg), console=console)
    figures = measure(models, spread(heldout, DISTILL_EVAL_PROMPTS), [], checks, seed=cfg.seed, console=console)
    settings = {"prompts": "held-out", "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "seed": cfg.seed, "checks": str(cfg.checks) if cfg.checks else None, "sampler": models.sampler}
    report = EvalReport(str(cfg.out), cfg.model, sha256_text(system), **figures, settings=settings)
    report.gates = apply_gates(report, min_gap_closed=cfg.min_gap_closed, min_pass_rate=cfg.min_pass_rate)
    print_report(report, console, samples=0)
    return report



def _loading(cfg: DistillConfig | EvalConfig) -> dict:
    """load_compared's settings, which distill and eval share. distill's closing evaluation, which its
    gates read, samples the exact way."""
    sampler = cfg.sampler if isinstance(cfg, EvalConfig) else "exact"
    return dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.batch_size,
                chunk_size=cfg.chunk_size, chat_template=cfg.chat_template, trust_remote_code=cfg.trust_remote_code,
                allow_pickle=cfg.allow_pickle, sampler=sampler)
