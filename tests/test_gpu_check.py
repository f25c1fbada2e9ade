"""The GPU check's --dry-run: the whole script, on CPU at toy sizes, so it is known to work before a GPU sees it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_dry_run_writes_a_passing_report(tmp_path):
    pytest.importorskip("bitsandbytes", reason="the dry run's 4-bit sections need bitsandbytes")
    # A generous budget: on a busy CI machine every section must still run (no skips), whatever the clock says.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--budget-s", "1800"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = {s["name"]: s for s in report["sections"]}
    assert [s for s in sections.values() if "skipped" in s] == []
    checks = sections["device checks"]
    assert {k for k, v in checks.items() if isinstance(v, dict)} == {
        "decoder_vs_hf", "exact_kl_vs_float64", "own_sampler_vs_generate", "4bit_lora_gradients",
        "quantised_fast_sampler", "micro_batch_and_checkpointing"}
    assert all(v["passed"] for v in checks.values() if isinstance(v, dict))
    assert checks["quantised_fast_sampler"]["4bit"]["sampler"].startswith("LeanDecoder on the 4-bit weights")
    bake = sections["SmolLM2 bake, --quant auto, closing evaluation"]
    assert bake["passed"] and bake["results"]["eval"]  # the closing evaluation ran
    bench = sections["bench_opcd (toy model, 4 new tokens)"]
    assert [r["path"] for r in bench["paths"]] == ["fast", "naive"]
    assert bench["paths"][0]["sampler"].startswith("LeanDecoder on the 4-bit weights")
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# promptbake GPU check (dry run, CPU, toy sizes)") and "| device checks | ok |" in md


def test_prepare_carry_instructions_name_every_missing_package():
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    text = gpu_check.how_to_carry()
    for name in ("bitsandbytes", "gguf", "trl", "datasets", "--prepare-carry", ".gpu_carry/site", "--smollm2"):
        assert name in text
