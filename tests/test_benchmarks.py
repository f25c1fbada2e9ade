"""The benchmark scripts run end to end on the tiny model (figures are not checked, only their presence)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_trl_runs_both_tools(tiny_dir):
    pytest.importorskip("trl", reason="bench_trl.py needs trl: pip install -e '.[bench]'")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_trl.py"), "--model", str(tiny_dir), "--steps", "2",
         "--prompts-which", "short"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(out["results"]) == ["short"]
    short = out["results"]["short"]
    for tool in ("promptbake", "trl"):
        assert short[tool]["steps_timed"] == 1  # the first of the 2 steps is left out
        assert short[tool]["seconds"]["step"] > 0
        assert short[tool]["peak_rss_mib"] > 0
        assert short[tool]["response_tokens_per_s"] > 0
    assert short["ratio"]["seconds_per_step"] > 0 and short["ratio"]["peak_rss"] > 0


def test_bench_trl_rejects_unknown_prompt_choice(tiny_dir):
    pytest.importorskip("trl", reason="bench_trl.py needs trl: pip install -e '.[bench]'")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_trl.py"), "--model", str(tiny_dir), "--prompts-which", "short,huge"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "--prompts-which: unknown huge; choose from short, long."


def test_bench_plan_sets_the_estimate_beside_a_real_bake(tiny_dir, prompt_files, tmp_path):
    system, prompts = prompt_files
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_plan.py"), "--model", str(tiny_dir), "--prompt", str(system),
         "--steps", "3", "--json", str(out), "--", "--prompts", str(prompts), "--batch-size", "2",
         "--max-new-tokens", "8"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["steps"] == 3 and result["flags"][-1] == "8"
    for part in ("estimate", "measured"):
        assert set(result[part]["per_step_phases"]) == {"rollout", "teacher", "student", "optim"}
        assert result[part]["per_step"] > 0
    assert result["measured"]["heldout_kl"] >= 0 and result["measured"]["wall"] > 0  # tiny: the first is ~0.0 s
    for row in ("rollout s / step", "step s", "held-out KL s"):
        assert row in proc.stdout


def test_bench_eval_runs_each_sampler_on_one_bake(tiny_dir, prompt_files, tmp_path):
    system, _ = prompt_files
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_eval.py"), "--model", str(tiny_dir), "--prompt", str(system),
         "--bake-steps", "2", "--max-prompts", "4", "--json", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["sampler"] for r in results] == ["fast", "exact"]
    for r in results:
        assert r["seconds"] > 0 and r["reverse_kl"]["base"][0] > 0 and r["drift"] is not None
    assert "fast / exact time:" in proc.stdout
