"""The CI recipes in examples/ci/ run as written: their promptbake commands, on the tiny model.

Each recipe is parsed (YAML), its shell lines are read in order, and every `promptbake ...`
line runs in-process (CliRunner) in a copy of examples/ci/ whose promptbake.toml points at the
tiny model with quick settings. The recipe's own `python -c` snippets (reading the bake key) and
`find` housekeeping run for real. A recipe whose commands stop working fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from promptbake.cli import app
from promptbake.configfile import toml_value

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "ci"
QUICK = {"steps": 2, "batch_size": 2, "max_new_tokens": 6, "holdout": 0.3}


def github_lines(doc: dict) -> list[str]:
    steps = doc["jobs"]["bake"]["steps"]
    return [line for s in steps if "run" in s for line in s["run"].splitlines() if line.strip()]


def gitlab_lines(doc: dict) -> list[str]:
    return list(doc["bake"]["script"])


def project(tmp_path: Path, tiny_model: Path, prompts: Path) -> Path:
    """A copy of examples/ci/ whose promptbake.toml points at the tiny model, quick, without gates (tiny can't pass)."""
    folder = tmp_path / "project"
    shutil.copytree(EXAMPLES, folder)
    doc = tomllib.loads((folder / "promptbake.toml").read_text())
    doc["model"] = str(tiny_model)
    doc["distill"].update(QUICK, prompts=str(prompts))
    doc["distill"].pop("min_gap_closed")
    doc["eval"].update(prompts=str(prompts), max_prompts=2, max_new_tokens=6)
    for gate in ("min_gap_closed", "max_drift"):
        doc["eval"].pop(gate)
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for table in ("distill", "eval"):
        lines += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in doc[table].items()]
    (folder / "promptbake.toml").write_text("\n".join(lines) + "\n")
    return folder


def run_promptbake(line: str, env: dict, cwd: Path):
    """One `promptbake ... [> file]` line, in-process; returns the CliRunner result."""
    words = shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], line))
    target = None
    if ">" in words:
        at = words.index(">")
        words, target = words[:at], words[at + 1]
    result = CliRunner().invoke(app, words[1:])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 0, f"{line}\n{result.output}"
    if target:
        (cwd / target).write_text(result.stdout)
    return result


def python_snippet(line: str) -> str | None:
    match = re.search(r"\$\(python -c '([^']*)'\)", line)
    return match.group(1) if match else None


def run_recipe(lines: list[str], folder: Path) -> dict:
    env = {"GITHUB_OUTPUT": str(folder / "github_output"), "GITHUB_STEP_SUMMARY": str(folder / "summary.md")}
    ran = []
    for line in lines:
        line = line.strip()
        if line.startswith("promptbake "):
            run_promptbake(line, env, folder)
            ran.append(line.split()[1])
        elif (snippet := python_snippet(line)) is not None:
            value = subprocess.run([sys.executable, "-c", snippet], cwd=folder, capture_output=True, text=True,
                                   check=True).stdout.strip()
            name = "BAKE_KEY" if line.startswith("export BAKE_KEY=") else "key"
            env[name] = value
        elif line.startswith(("find ", "test -f ")):
            subprocess.run(["bash", "-c", line], cwd=folder, env={**os.environ, **env}, check=True)
    env["ran"] = ran
    return env


@pytest.fixture
def inputs(prompt_files):
    return prompt_files


def test_github_actions_recipe(tiny_model, inputs, tmp_path, monkeypatch):
    _, prompts = inputs
    folder = project(tmp_path, tiny_model, prompts)
    doc = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    monkeypatch.chdir(folder)
    env = run_recipe(github_lines(doc), folder)
    assert env["ran"] == ["plan", "distill", "eval"]
    plan = json.loads((folder / "plan.json").read_text())
    distill = json.loads((folder / "distill.json").read_text())
    assert env["key"] == plan["bake_key"] == distill["bake_key"]  # the snippet reads the key the bake records
    assert distill["ok"] and json.loads((folder / "eval.json").read_text())["ok"]
    assert (folder / "summary.md").read_text() == (folder / "report" / "eval.md").read_text()
    # The cached output is the config's --out, under the key the plan printed.
    steps = {s.get("name"): s for s in doc["jobs"]["bake"]["steps"]}
    cache = steps["Restore a bake with the same key"]["with"]
    assert cache["path"] == "baked" and (folder / "baked" / "promptbake.json").is_file()
    assert cache["key"] == "bake-${{ steps.plan.outputs.key }}"
    for path in steps["Upload the report and the checkpoint"]["with"]["path"].split():
        assert (folder / path).exists(), path
    # A second run with the restored output is up to date.
    again = run_promptbake("promptbake distill --config promptbake.toml --json > again.json", env, folder)
    assert json.loads(again.stdout)["up_to_date"] is True


def test_gitlab_recipe(tiny_model, inputs, tmp_path, monkeypatch):
    _, prompts = inputs
    folder = project(tmp_path, tiny_model, prompts)
    doc = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text())
    (folder / ".bakes" / "stale-key").mkdir(parents=True)  # an older bake, cleared by the recipe
    monkeypatch.chdir(folder)
    env = run_recipe(gitlab_lines(doc), folder)
    assert env["ran"] == ["plan", "distill", "eval"]
    key = json.loads((folder / "plan.json").read_text())["bake_key"]
    assert env["BAKE_KEY"] == key
    assert [p.name for p in (folder / ".bakes").iterdir()] == [key]
    assert json.loads((folder / "eval.json").read_text())["baked"] == f".bakes/{key}"
    for path in doc["bake"]["artifacts"]["paths"]:
        assert (folder / path).exists(), path
