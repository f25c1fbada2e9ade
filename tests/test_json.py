"""--json: one JSON object on stdout, human output on stderr, also when a command fails."""

from __future__ import annotations

import json

from ci_bakes import ci_bake, invoke  # noqa: F401  (ci_bake: a session fixture)


def test_distill_json_matches_the_record(ci_bake):
    answer = json.loads(ci_bake.stdout)  # stdout is the JSON object and nothing else
    record = ci_bake.record
    assert answer["command"] == "distill" and answer["ok"] is True and answer["exit_code"] == 0
    assert answer["error"] is None and answer["up_to_date"] is False
    assert answer["bake_key"] == record["bake"]["key"]
    assert answer["results"] == record["results"]
    assert answer["gates"] == record["results"]["eval"]["gates"] == [] and answer["gates_passed"] is None
    assert answer["out"] == str(ci_bake.out)
    assert answer["files"]["record"] == str(ci_bake.out / "promptbake.json")
    assert answer["files"]["settings"] == str(ci_bake.out / "promptbake.toml")


def test_up_to_date_json(ci_bake):
    result = invoke("distill", "--config", ci_bake.config, "--json")
    answer = json.loads(result.stdout)
    assert answer["up_to_date"] is True and answer["exit_code"] == 0
    assert answer["results"] == ci_bake.record["results"] and answer["bake_key"] == ci_bake.record["bake"]["key"]
    assert "up to date" in result.stderr


def test_failure_still_answers_in_json(ci_bake, tmp_path):
    for command in ("distill", "eval", "plan"):
        result = invoke(command, "--config", tmp_path / "missing.toml", "--json")
        assert result.exit_code == 2
        answer = json.loads(result.stdout)
        assert answer == {"command": command, "exit_code": 2, "ok": False,
                          "error": f"error: --config {tmp_path / 'missing.toml'} does not exist.",
                          "gates_passed": None}
        assert result.stderr.startswith("error: --config")
    result = invoke("distill", "--config", ci_bake.config, "--steps", "3", "--json")
    answer = json.loads(result.stdout)
    assert answer["exit_code"] == 2 and "already exists; pass --overwrite" in answer["error"]


def test_eval_json_and_a_missed_gate(ci_bake, prompt_files, tmp_path):
    _, prompts = prompt_files
    report = tmp_path / "report"
    result = invoke("eval", "--config", ci_bake.config, "--prompts", prompts, "--ood", prompts, "--max-prompts", "2",
                    "--max-new-tokens", "6", "--report", report, "--max-drift", "0", "--json")
    answer = json.loads(result.stdout)
    assert result.exit_code == answer["exit_code"] == 4  # KL drift is above 0
    assert answer["ok"] is False and answer["error"] is None and answer["gates_passed"] is False
    assert answer["gates"][0]["option"] == "--max-drift" and answer["gates"][0]["passed"] is False
    assert answer["baked"] == str(ci_bake.out) and answer["bake_key"] == ci_bake.record["bake"]["key"]
    assert answer["results"] == json.loads((report / "eval.json").read_text())
    assert "fidelity" in result.stderr  # the report's tables went to stderr


def test_a_refused_command_line_still_answers_in_json():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "promptbake.cli", "distill", "--json", "--steps", "abc"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    answer = json.loads(done.stdout)
    assert answer["command"] == "distill" and answer["exit_code"] == 2 and answer["ok"] is False
    assert done.stderr.startswith("error: Invalid value for '--steps'") and done.stderr.count("\n") == 1
    assert answer["error"] == done.stderr.strip()  # the same reason, in the answer too
