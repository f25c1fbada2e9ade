"""Paired difference in reverse-KL gap closed between two bakes of one prompt, on the same eval prompts.

Two bakes evaluated against one reference (same eval prompts, seed and machine) differ by less
than their own standard errors suggest: much of each error is which prompts are hard, and that
is shared. This resamples the prompts (bootstrap) with the same draw for both bakes and the
base, and prints the difference B - A in points with its standard error; and, for bakes that
kept each `ood` prompt's drift, the paired difference of the drift KL.

    python benchmarks/paired_gap.py A.json:INDEX B.json:INDEX   (INDEX: the bake's position in "runs")
"""

from __future__ import annotations

import json
import sys

import numpy as np


def load(spec: str) -> tuple[dict, dict]:
    path, _, index = spec.rpartition(":")
    data = json.loads(open(path, encoding="utf-8").read())
    return data, data["runs"][int(index)]


def per_token(rows: list, picks: np.ndarray) -> np.ndarray:
    """Per-token KL on each resample of prompts (rows of `picks`); rows: each prompt's KL sum and tokens."""
    rows = np.array(rows, dtype=float)
    return rows[picks, 0].sum(1) / rows[picks, 1].sum(1)


def gap(run: dict, picks: np.ndarray) -> np.ndarray:
    """Gap closed on each resample of prompts, as compare_methods computes it."""
    kl = run["per_prompt"]["reverse"]
    return 1 - per_token(kl["baked"], picks) / per_token(kl["base"], picks)


def drift(run: dict) -> list:
    """Each `ood` prompt's drift KL sum and tokens ([] for a bake measured before they were kept)."""
    return run["per_prompt"].get("drift", {}).get("baked", [])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    (_, a), (_, b) = load(argv[0]), load(argv[1])
    if a["prompt"] != b["prompt"] or a["eval_prompts"] != b["eval_prompts"]:
        sys.exit("error: the two bakes were not evaluated on the same prompt and eval prompts")
    n = len(a["per_prompt"]["reverse"]["baked"])
    everything = np.arange(n)[None]
    picks = np.random.default_rng(0).integers(0, n, size=(4000, n))
    diff = gap(b, picks) - gap(a, picks)
    gap_a, gap_b = gap(a, everything)[0], gap(b, everything)[0]
    print(f"{a['prompt']}: A {gap_a:.1%}, B {gap_b:.1%}, B - A {100 * (gap_b - gap_a):+.1f} points "
          f"± {100 * diff.std():.1f} (paired bootstrap over {n} prompts)")
    if drift(a) and len(drift(a)) == len(drift(b)):  # the same `ood` prompts for both
        m = len(drift(a))
        picks = np.random.default_rng(0).integers(0, m, size=(4000, m))
        every = np.arange(m)[None]
        d_a, d_b = per_token(drift(a), every)[0], per_token(drift(b), every)[0]
        d = per_token(drift(b), picks) - per_token(drift(a), picks)
        print(f"drift KL(baked || base): A {d_a:.4f}, B {d_b:.4f}, B - A {d_b - d_a:+.4f} ± {d.std():.4f} "
              f"(paired bootstrap over {m} `ood` prompts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
