"""promptbake eval / chat and distill's own evaluation, on a tiny real model.

The tiny model is built with a larger initialisation (initializer_range 0.1) so that
its outputs depend strongly on context: the system prompt then moves the teacher far
from the base, and a few LoRA steps at lr 1e-2 measurably close that gap.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from promptbake import DistillConfig, distill
from promptbake.checks import parse_checks
from promptbake.cli import app
from promptbake.config import EvalConfig
from promptbake.eval import KL, CheckRates, EvalReport, apply_gates, evaluate, gap_closed, gap_closed_stderr, markdown
from promptbake.data import spread
from promptbake.eval.report import write_report
from promptbake.losses import chunked_kl as token_kl
from promptbake.losses import token_forward_kl
from tiny import save_tiny

SYSTEM = "Arr matey, ahoy there! Ye be talking like a pirate now, aye."
CHECKS = """
[[check]]
name = "says arr"
contains_any = ["arr", "Arr"]

[[check]]
name = "short"
max_words = 50
"""
FAST = ["--max-prompts", "4", "--max-new-tokens", "6", "--batch-size", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base, a system prompt with sibling checks, and a 6-step bake of it."""
    root = tmp_path_factory.mktemp("eval")
    base = save_tiny(root / "base", initializer_range=0.1)
    prompt = root / "sys.txt"
    prompt.write_text(SYSTEM)
    (root / "sys.checks.toml").write_text(CHECKS)
    result = distill(DistillConfig(model=str(base), prompt=prompt, out=root / "baked", steps=6, lr=1e-2,
                                   batch_size=4, max_new_tokens=8), Console(file=io.StringIO()))
    return {"root": root, "base": base, "prompt": prompt, "baked": root / "baked", "result": result}


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def eval_args(tiny, *extra):
    return ["eval", "--baked", tiny["baked"], "--model", tiny["base"], "--prompt", tiny["prompt"], *FAST, *extra]


# ---------------------------------------------------------------- pure figures


def test_token_kl_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(7, 11, generator=g) * 3, torch.randn(7, 11, generator=g) * 3
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    reference = (p * (p.log() - q.log())).sum(-1)  # KL(p || q) per token, by hand in float64
    identity = lambda h: h  # noqa: E731  (the "hidden states" are the logits themselves)
    kl = token_kl(p_logits, q_logits, identity, identity, chunk_size=3)
    assert kl.shape == (7,) and kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), reference, rtol=1e-5, atol=1e-6)
    assert math.isclose(kl.mean().item(), reference.mean().item(), rel_tol=1e-5)
    # KL(teacher || x) on teacher samples is the same sum with the roles swapped.
    forward = token_kl(q_logits, p_logits, identity, identity, chunk_size=100)
    torch.testing.assert_close(forward, token_forward_kl(p_logits, q_logits))
    assert token_kl(p_logits[:0], q_logits[:0], identity, identity, chunk_size=3).shape == (0,)


def test_gap_closed():
    assert gap_closed(0.25, 1.0) == 0.75
    assert gap_closed(1.5, 1.0) == -0.5
    assert gap_closed(0.1, 0.0) is None


def test_spread_takes_evenly_spaced_items():
    assert spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread([1, 2], 4) == [1, 2]


def hand_report(baked_kl=0.25, base_kl=1.0, rates=((3, 4, 0), (1, 0, 0)), drift=0.05) -> EvalReport:
    checks = parse_checks({"check": [{"name": "a", "regex": "x"}, {"name": "b", "max_words": 3}]}, "t.toml")
    return EvalReport(
        "baked", "base", "0" * 64,
        reverse_kl={"baked": KL(baked_kl, 8, 100), "base": KL(base_kl, 8, 90)},
        forward_kl={"baked": KL(0.3, 8, 80), "base": KL(0.9, 8, 80)},
        checks=[CheckRates(c, dict(zip(("baked", "teacher", "base"), r)), 4) for c, r in zip(checks, rates)],
        drift=KL(drift, 8, 70), samples=[{"prompt": "p", "baked": "b", "teacher": "t", "base": "x"}],
    )


def test_gap_closed_standard_error_by_the_delta_method():
    # ratio 0.25 / 1.0; relative errors 0.05 / 0.25 = 0.2 and 0.1 / 1.0 = 0.1 -> 0.25 * sqrt(0.04 + 0.01).
    assert gap_closed_stderr(KL(0.25, 8, 100, 0.05), KL(1.0, 8, 90, 0.1)) == pytest.approx(0.25 * 0.05 ** 0.5)
    assert gap_closed_stderr(KL(0.0, 8, 100, 0.0), KL(1.0, 8, 90, 0.1)) == 0.0  # baked KL 0: nothing to scale
    assert gap_closed_stderr(KL(0.1, 8, 100, 0.01), KL(0.0, 8, 90, 0.0)) is None  # as gap_closed
    # From per-prompt sums: the mean per token and per_token_mean's standard error.
    kl = KL.from_sums([1.0, 3.0, 4.0], [10, 10, 20])
    assert (kl.value, kl.prompts, kl.tokens) == (pytest.approx(0.2), 3, 40)
    assert kl.stderr == pytest.approx(3 ** 0.5 / 40)
    report = hand_report()
    report.reverse_kl = {"baked": KL(0.25, 8, 100, 0.05), "base": KL(1.0, 8, 90, 0.1)}
    assert apply_gates(report, min_gap_closed=0.7)[0].message == "gap closed 75.0% ± 5.6% >= --min-gap-closed 0.7"
    assert report.to_json()["fidelity"]["gap_closed_stderr"] == round(0.25 * 0.05 ** 0.5, 4)
    assert "75% ± 6" in markdown(report)


def test_gates_compare_against_thresholds():
    report = hand_report()
    gates = apply_gates(report, min_gap_closed=0.75, min_pass_rate=0.75, max_drift=0.05)
    assert [g.passed for g in gates] == [True, True, True, True]
    assert gates[0].message == "gap closed 75.0% >= --min-gap-closed 0.75"
    # check b: the teacher passes 0/4, so any baked rate is at least F x 0.
    assert gates[2].value is None
    gates = apply_gates(report, min_gap_closed=0.8, min_pass_rate=0.8, max_drift=0.04)
    assert [g.passed for g in gates] == [False, False, True, False]
    assert gates[0].message == "gap closed 75.0% is below --min-gap-closed 0.8"
    assert gates[1].message == ("check 'a': baked passes 3/4 (75%), below --min-pass-rate 0.8 x teacher's 4/4 (100%)")
    assert gates[3].message == "drift KL(baked || base) 0.0500 per token is above --max-drift 0.04"
    assert apply_gates(report) == []
    flat = apply_gates(hand_report(base_kl=0.0), min_gap_closed=0.1)[0]
    assert not flat.passed and "can't be measured" in flat.message


def test_report_without_matplotlib_writes_the_rest(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    out = io.StringIO()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "kl": 0.5}\n')
    write_report(hand_report(), tmp_path / "report", metrics, Console(file=out, width=200))
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["eval.json", "eval.md"]
    assert "note: plots skipped: matplotlib is not installed (pip install 'promptbake[plot]')." in out.getvalue()
    data = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert data["fidelity"]["gap_closed"] == 0.75


def test_report_plots_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "kl": 0.5}\n{"step": 2, "kl": 0.3}\n{"step": 3, "k')  # torn last line
    write_report(hand_report(), tmp_path / "report", metrics, Console(file=io.StringIO()))
    for name in ("training_curve.png", "check_pass_rates.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- on the tiny model


def test_distill_records_its_evaluation_and_closes_part_of_the_gap(tiny):
    record = json.loads((tiny["baked"] / "promptbake.json").read_text())
    ev = record["results"]["eval"]
    assert ev["fidelity"]["reverse_kl"]["base"]["prompts"] == 16
    assert [c["name"] for c in ev["checks"]] == ["says arr", "short"]  # the sibling checks file
    assert ev["drift"] is None and ev["gates"] == [] and ev["passed"]
    assert ev["fidelity"]["gap_closed"] > 0.1


def test_eval_closes_part_of_the_gap_on_held_out_prompts(tiny):
    cfg = EvalConfig(baked=tiny["baked"], model=str(tiny["base"]), prompt=tiny["prompt"], max_prompts=8,
                     max_new_tokens=8, min_gap_closed=0.1)
    report = evaluate(cfg, Console(file=io.StringIO()))
    r = report.reverse_kl
    assert r["baked"].prompts == 8 and r["baked"].tokens > 0
    assert r["baked"].value < r["base"].value  # KL(baked || teacher) < KL(base || teacher)
    assert report.gap_closed > 0.1 and report.passed
    assert report.drift.value > 0 and report.drift.prompts == 8
    # Each KL carries its standard error over the 8 prompts; the gap closed carries one from both.
    assert all(k.stderr > 0 for k in (*r.values(), *report.forward_kl.values()))
    assert 0 < report.gap_closed_stderr < 1
    assert report.gap_closed_stderr == pytest.approx(gap_closed_stderr(r["baked"], r["base"]))


def test_fast_evaluation_samples_what_the_exact_one_does(tiny, monkeypatch):
    """--sampler fast draws each system's answers from that system's weights: in float32 its LeanDecoder
    copies give the exact loop's answers token for token (in bf16 they differ only by rounding)."""
    import torch

    import promptbake.samplers
    from promptbake.data import load_prompts, spread
    from promptbake.eval.systems import load_compared

    monkeypatch.setattr(promptbake.samplers, "rollout_dtype", lambda dtype, device: torch.float32)
    prompts = spread(load_prompts("eval"), 6)
    answers = {}
    for how in ("fast", "exact"):
        models = load_compared(tiny["baked"], str(tiny["base"]), SYSTEM, max_new_tokens=8, temperature=1.0,
                               batch_size=4, sampler=how, console=Console(file=io.StringIO()))
        assert models.sampler == how
        assert ("LeanDecoder on the baked model" in models.samplers["baked"].description) == (how == "fast")
        answers[how] = {s: models.sample(s, prompts, seed=3) for s in ("baked", "teacher", "base")}
    assert answers["fast"] == answers["exact"]
    assert answers["fast"]["baked"] != answers["fast"]["base"] != answers["fast"]["teacher"]


def test_eval_records_the_sampler_it_used(tiny, tmp_path):
    for extra, expected in (([], "exact"), (["--sampler", "fast"], "fast")):
        result = run(*eval_args(tiny, "--report", tmp_path / expected, *extra))
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / expected / "eval.json").read_text())["settings"]["sampler"] == expected
    record = json.loads((tiny["baked"] / "promptbake.json").read_text())
    assert record["results"]["eval"]["settings"]["sampler"] == "exact"  # distill's closing evaluation: its gates
    bad = run(*eval_args(tiny, "--sampler", "quick"))
    assert bad.exit_code == 2 and "'quick' is not one of 'exact', 'fast'" in " ".join(bad.output.replace("│", "").split())


def test_eval_cli_prints_and_writes_reports(tiny, tmp_path):
    result = run(*eval_args(tiny, "--report", tmp_path / "rep", "--min-gap-closed", "0", "--min-pass-rate", "0"))
    assert result.exit_code == 0, result.output
    for heading in ("fidelity: per-token KL to the teacher", "behaviour checks: pass rate", "samples",
                    "drift on unrelated prompts: KL(baked ‖ base)"):
        assert heading in result.output
    assert "gate passed: gap closed" in result.output
    data = json.loads((tmp_path / "rep" / "eval.json").read_text())
    fid = data["fidelity"]
    for figure in ("reverse_kl", "forward_kl"):
        for system in ("baked", "base"):
            assert fid[figure][system]["prompts"] == 4 and fid[figure][system]["tokens"] > 0
    assert {c["name"]: c["responses"] for c in data["checks"]} == {"says arr": 4, "short": 4}
    assert set(data["checks"][0]) >= {"baked", "teacher", "base"}
    assert data["drift"]["prompts"] == 4 and data["drift"]["tokens"] > 0
    assert len(data["samples"]) == 4 and set(data["samples"][0]) == {"prompt", "baked", "teacher", "base"}
    assert data["passed"] and len(data["gates"]) == 3
    md = (tmp_path / "rep" / "eval.md").read_text()
    assert md.startswith("# promptbake eval") and "| says arr |" in md


def test_missed_thresholds_exit_4_naming_each(tiny):
    result = run(*eval_args(tiny, "--min-gap-closed", "0.999", "--max-drift", "0"))
    assert result.exit_code == 4, result.output
    assert "gate failed: gap closed " in result.output and "is below --min-gap-closed 0.999" in result.output
    assert "gate failed: drift KL(baked || base) " in result.output and "is above --max-drift 0" in result.output


@pytest.mark.parametrize("case", ["bad checks", "not a checkpoint", "no weights", "other vocab", "other arch",
                                  "empty prompts", "pass rate without checks", "bad threshold", "report is a file"])
def test_bad_input_is_one_line_exit_2_nothing_written(tiny, tmp_path, case):
    args = eval_args(tiny, "--report", tmp_path / "rep")
    baked = tmp_path / "baked"
    shutil.copytree(tiny["baked"], baked)
    args[2] = baked
    if case == "bad checks":
        (tmp_path / "c.toml").write_text('[[check]]\nname = "x"\nregex = "("\n')
        args += ["--checks", tmp_path / "c.toml"]
        expected = f"error: checks file {tmp_path / 'c.toml'}, check 'x': regex '(' is not a valid regular expression"
    elif case == "not a checkpoint":
        args[2] = tmp_path
        expected = f"error: --baked {tmp_path} is not a checkpoint (no config.json); give the --out folder of"
    elif case == "no weights":
        (baked / "model.safetensors").unlink()
        expected = f"error: --baked {baked} has a config.json but no weights (*.safetensors)"
    elif case == "other vocab":
        record = json.loads((baked / "promptbake.json").read_text())
        record.update(vocab_size=49152, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
        (baked / "promptbake.json").write_text(json.dumps(record))
        expected = (f"error: --baked {baked} is a llama model with a 400-token vocabulary but --model {tiny['base']} "
                    "is a llama model with 400 (promptbake.json says it was baked from "
                    "HuggingFaceTB/SmolLM2-135M-Instruct); pass the --model the bake started from.")
    elif case == "other arch":
        config = json.loads((baked / "config.json").read_text())
        config.update(model_type="mistral", architectures=["MistralForCausalLM"])
        (baked / "config.json").write_text(json.dumps(config))
        expected = f"error: --baked {baked} is a mistral model with a 400-token vocabulary but --model"
    elif case == "empty prompts":
        (tmp_path / "empty.txt").write_text("# only a comment\n\n")
        args += ["--prompts", tmp_path / "empty.txt"]
        expected = f"error: prompt set {tmp_path / 'empty.txt'} holds no prompts."
    elif case == "pass rate without checks":
        lone = tmp_path / "lone.txt"
        lone.write_text(SYSTEM)
        args[6] = lone
        args += ["--min-pass-rate", "0.8"]
        expected = f"error: --min-pass-rate needs checks: give --checks FILE or put lone.checks.toml beside {lone}."
    elif case == "bad threshold":
        args += ["--min-gap-closed", "50"]
        expected = "error: --min-gap-closed must be a fraction between 0 and 1 (got 50.0)."
    else:
        (tmp_path / "rep").write_text("")
        expected = f"error: --report {tmp_path / 'rep'} exists and is a file; choose a folder path."
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(expected), result.output
    assert result.output.count("\n") == 1 or case == "other vocab"  # long lines may soft-wrap in the runner
    assert "Traceback" not in result.output
    assert not (tmp_path / "rep").is_dir()


def test_distill_gate_exits_4_after_publishing(tiny, tmp_path):
    out = tmp_path / "baked"
    result = run("distill", "--model", tiny["base"], "--prompt", tiny["prompt"], "--out", out, "--steps", "1",
                 "--batch-size", "2", "--max-new-tokens", "4", "--prompts", "eval", "--min-gap-closed", "1",
                 "--min-pass-rate", "0")
    assert result.exit_code == 4, result.output
    assert "gate failed: gap closed" in result.output and "is below --min-gap-closed 1" in result.output
    gates = json.loads((out / "promptbake.json").read_text())["results"]["eval"]["gates"]
    assert [g["option"] for g in gates] == ["--min-gap-closed", "--min-pass-rate", "--min-pass-rate"]


@pytest.mark.parametrize("extra, expected", [
    (["--no-eval", "--min-gap-closed", "0.5"], "error: --min-gap-closed and --min-pass-rate need the evaluation: "
                                               "drop --no-eval."),
    (["--checks", "missing.toml"], "error: checks file missing.toml does not exist."),
])
def test_distill_eval_options_are_checked_first(tiny, tmp_path, extra, expected):
    out = tmp_path / "baked"
    result = run("distill", "--model", tiny["base"], "--prompt", tiny["prompt"], "--out", out, *extra)
    assert result.exit_code == 2 and result.output.startswith(expected), result.output
    assert not out.exists()


def test_chat_shows_three_answers(tiny):
    result = run("chat", tiny["baked"], "--model", tiny["base"], "--prompt", tiny["prompt"],
                 "--message", "Why is the sky blue?", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "teacher" in line)
    assert header.index("baked") < header.index("teacher") < header.index("base")


def test_chat_refuses_an_empty_message(tiny):
    result = run("chat", tiny["baked"], "--model", tiny["base"], "--prompt", tiny["prompt"], input="  \n")
    assert result.exit_code == 2
    assert result.output == "error: the message is empty: pass --message TEXT or pipe the text on stdin.\n"
