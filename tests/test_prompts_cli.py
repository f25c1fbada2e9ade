"""`promptbake prompts` and the prompt options of `promptbake distill`, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from promptbake.cli import app
from promptbake.data import load_prompts
from promptbake.sampling import rollout_dtype

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # so rich doesn't cut table rows in these assertions


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_prompts_lists_the_bundled_sets_and_example_system_prompts():
    result = runner.invoke(app, ["prompts"], env=WIDE)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for name in ("default", "eval", "ood"):
        assert any(line.startswith(f"│ {name} ") and f" {len(load_prompts(name))} │" in line for line in lines), name
    for name in ("concise", "expert", "french", "json", "pirate", "support"):
        assert any(f"system/{name}.txt" in line for line in lines), name


def test_prompts_shows_what_a_csv_yields(tmp_path):
    csv = tmp_path / "some.csv"
    csv.write_text("id,q\n1,Why is the sky blue?\n2,\n3,Why is the  sky blue?\n4,Write a haiku.\n", encoding="utf-8")
    result = runner.invoke(app, ["prompts", str(csv), "--prompt-field", "q"], env=WIDE)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"2 prompts from {csv} (4 read; dropped: 1 empty, 1 duplicated)"
    shown = [line for line in lines if line.startswith("│ ")]
    assert len(shown) == 2
    assert {line.split("│")[3].strip() for line in shown} == {"Why is the sky blue?", "Write a haiku."}


def test_prompts_shows_multi_turn_compactly_and_caps_with_max_prompts(tmp_path):
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Why is the sky blue?"}]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}] + [{"prompt": f"q{i}"} for i in range(9)])
    result = runner.invoke(app, ["prompts", str(source), "--max-prompts", "10", "--seed", "3"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"10 prompts from {source} (10 read; dropped: none)"
    # A conversation: one line per turn, in a row of its own.
    turns = ["│     3 │ user: Hi there ", "│       │ assistant: Hello! How can I help? ", "│       │ user: Why is the sky blue? "]
    lines = result.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if turns[0] in line)
    assert all(turn in line for turn, line in zip(turns, lines[at : at + 3]))

    result = runner.invoke(app, ["prompts", str(source), "--max-prompts", "4"], env=WIDE)
    assert result.stdout.splitlines()[0] == f"4 prompts from {source} (10 read; dropped: 6 beyond --max-prompts)"


def test_prompts_bad_source_is_one_line_and_exit_2(tmp_path):
    csv = tmp_path / "qa.csv"
    csv.write_text("question,answer\nWhy?,Because.\n", encoding="utf-8")
    result = runner.invoke(app, ["prompts", str(csv)])
    assert result.exit_code == 2
    assert result.stderr == (f"error: {csv}: no field 'prompt' (fields present: question, answer); "
                             "choose one with --prompt-field NAME.\n")
    assert result.stdout == ""


# --- distill: bad prompt sources stop it before anything is written. ---


@pytest.fixture
def bake_args(tiny_dir, tmp_path):
    system = tmp_path / "system.txt"
    system.write_text("Talk like a pirate.", encoding="utf-8")
    return ["distill", "--model", str(tiny_dir), "--prompt", str(system), "--out", str(tmp_path / "out")]


def test_distill_refuses_bad_prompt_sources_and_writes_nothing(bake_args, tmp_path, monkeypatch):
    from huggingface_hub import constants

    system_row = {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}
    cases = {
        "missing field": (write_jsonl(tmp_path / "a.jsonl", [{"text": "hi"}]), [],
                          "line 1: no field 'prompt' (fields present: text); choose one with --prompt-field NAME."),
        "system message": (write_jsonl(tmp_path / "b.jsonl", [{"prompt": "ok"}, system_row]), [],
                           "line 2: has a system message, which would conflict with the baked prompt; remove it."),
        "all empty": (write_jsonl(tmp_path / "c.jsonl", [{"prompt": ""}, {"prompt": None}]), [],
                      "yields no prompts: 2 read, dropped: 2 empty."),
        "offline hub id": ("promptbake-test/no-such-dataset", [],
                           "dataset promptbake-test/no-such-dataset is not in the local Hugging Face cache and "
                           "HF_HUB_OFFLINE=1; pass a local file or save_to_disk folder instead."),
        "negative cap": ("default", ["--max-prompts", "-1"], "--max-prompts must be 0 (all) or a positive number (got -1)."),
    }
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for case, (source, extra, message) in cases.items():
        result = runner.invoke(app, [*bake_args, "--prompts", str(source), *extra])
        assert result.exit_code == 2, (case, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.endswith(message + "\n"), (case, result.stderr)
        assert result.stderr.count("\n") == 1, case
        assert not (tmp_path / "out").exists(), case
        assert not list(tmp_path.glob(".out.partial*")), case


def test_distill_reports_what_was_dropped(bake_args, tmp_path):
    rows = [{"prompt": f"Why is the sky blue, question {i}?"} for i in range(7)]
    rows += [{"prompt": "Why is the sky blue, question 0?"}, {"prompt": ""},
             {"prompt": "Write a short poem about the sea and the wind. " * 100},
             {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Sort a list in Python?"}]}]
    source = write_jsonl(tmp_path / "mixed.jsonl", rows)
    result = runner.invoke(app, [*bake_args, "--prompts", str(source), "--steps", "1", "--batch-size", "2",
                                 "--max-new-tokens", "4", "--lora-rank", "2"])
    assert result.exit_code == 0, result.output
    assert (f"prompts: 8 prompts from {source} (11 read; dropped: 1 empty, 1 duplicated, "
            "1 too long for the context)") in result.stderr
    # Which sampler runs (or why the fast one can't) is said; bf16 on CPUs that run it natively, else fp32.
    sampled_in = str(rollout_dtype(torch.float32, torch.device("cpu"))).removeprefix("torch.")
    assert f"rollouts: LeanDecoder, {sampled_in}" in result.stderr
    record = json.loads((tmp_path / "out" / "promptbake.json").read_text())
    assert record["prompts"] == {"source": str(source), "read": 11,
                                 "dropped": {"empty": 1, "duplicate": 1, "too_long": 1},
                                 "train": 4, "heldout": 4, "dropped_too_long": 1}
    assert record["settings"]["prompt_field"] == "prompt" and record["settings"]["max_prompts"] == 0
