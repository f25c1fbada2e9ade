"""Smoke test: the method comparison runs one tiny configuration end to end (no timing assertions)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_methods.py"
CHECKS = '[[check]]\nname = "says arr"\nregex = "(?i)arr"\n\n[[check]]\nname = "short"\nmax_words = 30\n'


def compare(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_compare_methods_smoke(tiny_dir, tmp_path):
    system = tmp_path / "pirate.txt"
    system.write_text("Talk like a pirate and say arr.", encoding="utf-8")
    (tmp_path / "pirate.checks.toml").write_text(CHECKS, encoding="utf-8")
    train = tmp_path / "train.txt"
    train.write_text("\n".join(tiny.CORPUS + [f"Tell me fact {i}." for i in range(8)]) + "\n", encoding="utf-8")
    out = tmp_path / "results"
    args = ["--model", str(tiny_dir), "--examples", "none", "--prompt", str(system), "--train-prompts", str(train),
            "--seeds", "0", "--steps", "2", "--batch-size", "2", "--max-new-tokens", "6", "--eval-prompts", "3",
            "--ood-prompts", "2", "--out", str(out)]
    result = compare(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert sorted(r["method"] for r in data["runs"]) == ["offpolicy", "opcd", "sft"]
    for r in data["runs"]:
        assert r["prompt"] == "pirate" and r["settings"]["steps"] == 2
        assert r["reverse_kl"]["base"] > 0 and r["forward_kl"]["base"] > 0
        assert r["gap_closed_stderr"] > 0 and r["reverse_kl_stderr"]["base"] > 0  # one evaluation's own error
        assert r["drift"] > -1e-6  # a KL; float rounding can put an almost-zero one just below 0
        assert set(r["checks"]) == {"says arr", "short"}
        assert all(0 <= v <= 1 for rates in r["checks"].values() for v in rates.values())
        assert r["train_s"] >= 0 and r["eval_prompts"] == 3  # seconds, rounded: a 2-step tiny bake can round to 0.0
        for kind in ("reverse", "forward"):  # each prompt's KL sum and tokens add up to the mean reported
            for system in ("baked", "base"):
                per = r["per_prompt"][kind][system]
                assert len(per) == 3
                assert sum(s for s, _ in per) / sum(c for _, c in per) == pytest.approx(
                    r[f"{kind}_kl"][system], rel=1e-4, abs=1e-6)
        drift = r["per_prompt"]["drift"]["baked"]  # the same for the drift, and its own error is kept
        assert len(drift) == 2 and r["drift_stderr"] > 0
        assert sum(s for s, _ in drift) / sum(c for _, c in drift) == pytest.approx(r["drift"], rel=1e-4, abs=1e-6)
    ref = data["reference"]["pirate@6"]
    assert set(ref["checks"]) == {"says arr", "short"}
    md = (out / "results.md").read_text()
    assert "| pirate | opcd |" in md and "Can each check tell the prompted teacher from the base?" in md
    assert "gap closed" in result.stdout and "eval s.e." in result.stdout and "offpolicy" in result.stdout

    # A rerun with the same --out keeps the bakes it has and adds only the new seed; two seeds show a spread.
    again = compare(*[a if a != "0" else "0,1" for a in args[:-2]], "--methods", "sft", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 4 and sorted(r["seed"] for r in runs if r["method"] == "sft") == [0, 1]
    sft_row = next(line for line in again.stdout.splitlines() if line.startswith("pirate") and " sft " in line)
    assert " 2 " in sft_row and "±" in sft_row  # two seeds, with their spread

    # --eval-max-new-tokens judges a bake trained on shorter answers on the same 6-token answers as the others.
    short = compare(*args[:-2], "--methods", "opcd", "--max-new-tokens", "3", "--eval-max-new-tokens", "6",
                    "--out", str(out))
    assert short.returncode == 0, short.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    row = next(r for r in data["runs"] if r["settings"]["max_new_tokens"] == 3)
    assert row["eval"]["max_new_tokens"] == 6 and set(data["reference"]) == {"pirate@6"}  # the same teacher and base
    counts = [c for _, c in row["per_prompt"]["reverse"]["baked"]]
    assert max(counts) > 3 and max(counts) <= 6  # its own answers were sampled to 6 tokens, not to its 3
    assert "max_new_tokens=3, lr=0.0005, lora_rank=16, lora_alpha=32.0 (evaluated on 6 tokens)" in short.stdout

    # --by-check splits each bake's KLs by whether its answers pass each check: every answer lands on one side.
    split = compare("--by-check", "--out", str(out))
    assert split.returncode == 0, split.stderr[-3000:]
    lines = [line for line in split.stdout.splitlines() if line.startswith("pirate")]
    assert len(lines) == 5 * 2  # five bakes, two checks
    for line in lines:
        counts = [int(n) for n in re.findall(r"\(n (\d+)\)", line)]
        assert len(counts) == 8 and all(a + b == 3 for a, b in zip(counts[::2], counts[1::2]))

    # --rescore re-applies an edited checks file to the kept answers, baking nothing.
    (tmp_path / "pirate.checks.toml").write_text('[[check]]\nname = "any text"\nregex = "."\n', encoding="utf-8")
    rescored = compare("--rescore", "--out", str(out))
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert all(set(r["checks"]) == {"any text"} for r in data["runs"])
    assert set(data["reference"]["pirate@6"]["checks"]) == {"any text"}


def test_compare_methods_bad_input(tmp_path):
    result = compare("--methods", "opcd,dpo", "--out", str(tmp_path / "r"), timeout=120)
    assert result.returncode == 2 and "error: --methods: unknown dpo" in result.stderr
    assert "Traceback" not in result.stderr
    result = compare("--sweep", "colour=red", "--out", str(tmp_path / "r"), timeout=120)
    assert result.returncode == 2 and "error: --sweep 'colour=red'" in result.stderr
    # Every bake's settings pass distill's checks before anything loads or bakes.
    result = compare("--sweep", "samples_per_prompt=1,3", "--out", str(tmp_path / "r"), timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        'error: --sweep {"samples_per_prompt": 3}: --batch-size must be a multiple of --samples-per-prompt: '
        "got --batch-size 8 and --samples-per-prompt 3. Try --batch-size 9.")
    result = compare("--sweep", "lr_schedule=cosine,linear", "--out", str(tmp_path / "r"), timeout=120)
    assert result.returncode == 2
    assert "--lr-schedule must be one of constant, cosine (got 'linear')." in result.stderr
    result = compare("--eval-max-new-tokens", "-1", "--out", str(tmp_path / "r"), timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --eval-max-new-tokens must be 0 (each bake's own) or positive (got -1)")
    assert not (tmp_path / "r").exists()


def test_split_mean_is_the_per_token_mean_of_each_side():
    split_mean = load_script().split_mean
    pairs = [[1.0, 10], [3.0, 10], [4.0, 20]]
    assert split_mean(pairs, [True, False, True]) == "0.1667 (n 2) / 0.3000 (n 1)"
    assert split_mean(pairs, [False, False, False]) == "- (n 0) / 0.2000 (n 3)"


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluation_batches_rows_the_same_whatever_the_bakes_batch_size(tiny_dir):
    """Batching changes the numerics, and at temperature 1 one changed token changes an answer: if the
    evaluation sampled at each bake's --batch-size, bakes of different batch sizes would be measured
    against different teacher and base samples."""
    from rich.console import Console

    compare_methods = load_script()
    for bake_batch in (2, 6):
        args = compare_methods.parse_args(["--model", str(tiny_dir), "--batch-size", str(bake_batch),
                                           "--eval-prompts", "2", "--ood-prompts", "0"])
        evaluator = compare_methods.Evaluator(str(tiny_dir), args, Console(quiet=True))
        assert evaluator.compared(evaluator.base_lm, "Be brief.", 6, 1.0).batch_size == args.eval_batch_size == 8


def test_two_runs_writing_one_results_folder_keep_each_others_bakes(tmp_path):
    """Each run holds the results it read at its start; a write merges with the file instead of replacing it."""
    compare_methods = load_script()

    def row(seed):
        return {"prompt": "pirate", "method": "opcd", "seed": seed, "settings": {"steps": 2, "max_new_tokens": 6},
                "eval": {"prompts": 3},
                "gap_closed": 0.5, "forward_gap_closed": 0.5, "checks": {}, "drift": 0.1, "train_s": 1.0}

    first = {"runs": [], "reference": {"pirate@6": {"checks": {}, "eval": {"prompts": 3}}}}
    second = {"runs": [], "reference": {"french@6": {"checks": {}, "eval": {"prompts": 3}}}}
    first["runs"].append(row(0))
    compare_methods.write(first, tmp_path)
    second["runs"].append(row(1))  # this run read the folder before the first wrote its row
    compare_methods.write(second, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["seed"] for r in data["runs"]) == [0, 1]
    assert set(data["reference"]) == {"pirate@6", "french@6"}
    compare_methods.write(second, tmp_path)  # writing again adds nothing twice
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 2


def test_a_results_folder_measured_against_other_answers_is_refused(tiny_dir, tmp_path):
    """Bakes kept in a folder were measured against its teacher and base answers; where this machine samples
    others (another CPU kernel or torch build), or the eval prompts or seed differ, new bakes would not
    compare, so the run stops before it bakes anything and leaves the folder as it was."""
    system = tmp_path / "pirate.txt"
    system.write_text("Talk like a pirate and say arr.", encoding="utf-8")
    (tmp_path / "pirate.checks.toml").write_text(CHECKS, encoding="utf-8")
    out = tmp_path / "results"
    args = ["--model", str(tiny_dir), "--examples", "none", "--prompt", str(system), "--max-new-tokens", "6",
            "--eval-prompts", "3", "--ood-prompts", "0", "--methods", "none", "--out", str(out)]
    first = compare(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["reference"]["pirate@6"]["machine"]["cores"] >= 1
    assert compare(*args).returncode == 0  # the same machine samples the same answers
    assert json.loads((out / "results.json").read_text())["reference"]["pirate@6"]["reproduced_on"] == []

    # answers first sampled on another machine, reproduced here: the reference keeps where they come from
    here = data["reference"]["pirate@6"]["machine"]
    data["reference"]["pirate@6"]["machine"] = {**here, "cpu": "another CPU"}
    (out / "results.json").write_text(json.dumps(data))
    for _ in range(2):  # a second rerun lists this machine once
        assert compare(*args).returncode == 0
        reference = json.loads((out / "results.json").read_text())["reference"]["pirate@6"]
        assert reference["machine"]["cpu"] == "another CPU" and reference["reproduced_on"] == [here]
    data = json.loads((out / "results.json").read_text())

    data["reference"]["pirate@6"]["texts"]["teacher"][1] += " (sampled elsewhere)"
    (out / "results.json").write_text(json.dumps(data))
    kept = (out / "results.json").read_bytes()
    result = compare(*args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: pirate@6: the teacher's and the base's answers sampled here differ from the ones kept in "
        f"{out / 'results.json'} (1 of 3 teacher answers, 0 of 3 base): its bakes were measured against those, so "
        "new ones would not compare. Another machine or torch build samples differently; use another --out.")
    assert (out / "results.json").read_bytes() == kept

    result = compare(*[a if a != "3" else "4" for a in args])  # four eval prompts where three were kept
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"error: pirate@6: {out / 'results.json'} was measured on 3 eval prompts with eval seed 0, not 4 with "
        "seed 0; use another --out")
    assert (out / "results.json").read_bytes() == kept


def test_paired_gap_reproduces_the_kept_figures():
    """benchmarks/paired_gap.py on two kept french bakes (same eval prompts): each bake's gap closed is
    the one compare_methods recorded, a bake against itself differs by exactly 0, and bakes from folders
    with other eval prompts are refused."""
    script, kept = SCRIPT.parent / "paired_gap.py", SCRIPT.parent / "results" / "per-prompt" / "results.json"
    runs = json.loads(kept.read_text())["runs"]

    def paired(*specs):
        return subprocess.run([sys.executable, str(script), *specs], capture_output=True, text=True, timeout=120)

    same = paired(f"{kept}:0", f"{kept}:0")
    assert same.returncode == 0, same.stderr
    assert "B - A +0.0 points ± 0.0" in same.stdout
    other = paired(f"{kept}:0", f"{kept}:2")
    assert other.returncode == 0, other.stderr
    shown = re.search(r"A ([\d.]+)%, B ([\d.]+)%, B - A ([+-][\d.]+) points ± ([\d.]+)", other.stdout)
    a, b, diff, err = map(float, shown.groups())
    assert (a, b) == (round(100 * runs[0]["gap_closed"], 1), round(100 * runs[2]["gap_closed"], 1))
    assert diff == pytest.approx(b - a, abs=0.11) and 0 < err < 10
    refused = paired(f"{kept}:0", f"{kept}:1")  # spanish: another prompt
    assert refused.returncode != 0 and "not evaluated on the same prompt" in refused.stderr


def test_paired_gap_pairs_the_drift_where_bakes_kept_it(tmp_path):
    """Bakes that kept each `ood` prompt's drift get its paired difference too: per-token means of the
    kept sums, B - A, and a bootstrap error that is 0 for a bake against itself."""
    script = SCRIPT.parent / "paired_gap.py"
    reverse = {"baked": [[1.0, 10], [2.0, 10]], "base": [[4.0, 10], [4.0, 10]]}
    run = lambda drift: {"prompt": "p", "eval_prompts": 2, "per_prompt": {"reverse": reverse,  # noqa: E731
                                                                         "drift": {"baked": drift}}}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"runs": [run([[1.0, 10], [2.0, 10]]), run([[2.0, 10], [2.0, 10]]), run([])]}))

    def paired(*specs):
        return subprocess.run([sys.executable, str(script), *specs], capture_output=True, text=True, timeout=120)

    out = paired(f"{results}:0", f"{results}:1").stdout
    assert "drift KL(baked || base): A 0.1500, B 0.2000, B - A +0.0500 ± " in out
    assert "B - A +0.0000 ± 0.0000" in paired(f"{results}:0", f"{results}:0").stdout
    assert "drift" not in paired(f"{results}:0", f"{results}:2").stdout  # one bake measured before it was kept
