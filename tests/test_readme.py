"""The README stays true: every distill option is documented, and CI runs the README's test command."""

import re
from dataclasses import fields
from pathlib import Path

from promptbake.config import DistillConfig, EvalConfig, flag

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)


def test_every_distill_option_is_documented():
    missing = [flag(f.name) for f in fields(DistillConfig) if f"`{flag(f.name)}`" not in README]
    assert missing == []


def test_eval_thresholds_are_documented():
    for name in ("min_gap_closed", "min_pass_rate", "max_drift"):
        assert flag(name) in README
    assert {f.name for f in fields(EvalConfig)} >= {"baked", "model", "prompt", "checks", "report"}


def test_ci_runs_the_readme_test_command():
    test_command = next(b for b in _bash_blocks() if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command.strip() in ci.splitlines()


def test_readme_main_command_bakes_a_bundled_prompt():
    main = next(b for b in _bash_blocks() if "promptbake distill" in b)
    prompt = re.search(r"--prompt (\S+)", main).group(1)
    assert (ROOT / prompt).is_file()
