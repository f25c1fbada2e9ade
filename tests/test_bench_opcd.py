"""Smoke test: the OPCD benchmark runs one step of each path on the tiny model (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_opcd.py"


def test_bench_opcd_runs_both_paths(tiny_dir):
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_dir), "--steps", "1", "--batch-size", "2",
                          "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["path"] for r in results] == ["fast", "naive"]
    assert results[0]["sampler"].startswith("LeanDecoder") and results[1]["sampler"] == "HF generate on the PEFT model"
    for r in results:
        assert set(r["seconds"]) == {"rollout", "teacher", "student", "optimizer", "other", "step"}
        assert r["response_tokens_per_s"] > 0 and r["peak_rss_mib"] > 0


def test_bench_loss_memory_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--loss-memory", "--vocab", "1000", "--batch-size", "2",
                          "--max-new-tokens", "8", "--chunk-size", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loss peak extra memory, V=1000, N=16 tokens" in out.stdout
