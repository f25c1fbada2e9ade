"""--config FILE: precedence (file < flag), path resolution, types, and every error as one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import promptbake.bake
from promptbake.cli import app
from promptbake.config import DistillConfig, EvalConfig
from promptbake.configfile import load_settings, resolved_toml

runner = CliRunner()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


class Captured(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """The DistillConfig the CLI builds, caught at promptbake.bake.distill before any work."""
    seen = {}

    def distill(cfg, console=None, *, force=False):
        seen["cfg"], seen["force"] = cfg, force
        raise Captured

    monkeypatch.setattr(promptbake.bake, "distill", distill)
    return seen


def distill_cfg(captured, *args) -> DistillConfig:
    result = runner.invoke(app, ["distill", *map(str, args)])
    assert isinstance(result.exception, Captured), result.output
    return captured["cfg"]


def test_file_values_reach_the_command(tmp_path, captured):
    config = write(tmp_path / "proj" / "promptbake.toml", 'model = "org/name"\nprompt = "sys.txt"\n'
                   "[distill]\nsteps = 7\nbatch-size = 3\nlr = 1\nquant = \"none\"\nprefix_reuse = false\n")
    cfg = distill_cfg(captured, "--config", config)
    assert (cfg.model, cfg.steps, cfg.batch_size, cfg.lr, cfg.quant, cfg.prefix_reuse) == \
        ("org/name", 7, 3, 1.0, "none", False)
    assert isinstance(cfg.lr, float)
    assert cfg.prompt == tmp_path / "proj" / "sys.txt"  # against the file's folder, not the working directory


def test_training_schedule_and_samples_come_from_the_file(tmp_path, captured):
    config = write(tmp_path / "promptbake.toml", 'model = "org/name"\nprompt = "sys.txt"\n'
                   '[distill]\nlr-schedule = "cosine"\nsamples_per_prompt = 2\n')
    cfg = distill_cfg(captured, "--config", config)
    assert (cfg.lr_schedule, cfg.samples_per_prompt) == ("cosine", 2)
    cfg = distill_cfg(captured, "--config", config, "--lr-schedule", "constant", "--samples-per-prompt", "4")
    assert (cfg.lr_schedule, cfg.samples_per_prompt) == ("constant", 4)


def test_a_bad_samples_per_prompt_in_the_file_is_one_line(tmp_path):
    config = write(tmp_path / "promptbake.toml", 'model = "org/name"\nprompt = "sys.txt"\n'
                   '[distill]\nbatch_size = 6\nsamples_per_prompt = 4\n')
    r = runner.invoke(app, ["distill", "--config", str(config)])
    assert_one_error(r, "error: --batch-size must be a multiple of --samples-per-prompt: got --batch-size 6 and "
                        "--samples-per-prompt 4. Try --batch-size 8.")


def test_flags_override_the_file(tmp_path, captured):
    config = write(tmp_path / "promptbake.toml", 'model = "org/name"\nprompt = "sys.txt"\n'
                   "[distill]\nsteps = 7\nbatch_size = 3\nprefix_reuse = false\n")
    cfg = distill_cfg(captured, "--config", config, "--steps", "9", "--prefix-reuse", "--prompt", "other.txt")
    assert cfg.steps == 9 and cfg.prefix_reuse is True
    assert cfg.prompt == Path("other.txt")  # a flag's path stays as typed: relative to the working directory
    assert cfg.batch_size == 3  # not given as a flag: the file's
    # A flag given with the default's value still overrides the file.
    cfg = distill_cfg(captured, "--config", config, "--steps", str(DistillConfig.steps))
    assert cfg.steps == DistillConfig.steps


def test_without_a_file_defaults_apply(tmp_path, captured):
    cfg = distill_cfg(captured, "--model", "org/name", "--prompt", "p.txt", "--force")
    assert cfg.steps == DistillConfig.steps and captured["force"] is True


def test_paths_resolve_against_the_files_folder(tmp_path):
    folder = tmp_path / "proj"
    write(folder / "data" / "prompts.txt", "hi\n")
    write(folder / "models" / "m.gguf", "x")
    config = write(folder / "ci" / "promptbake.toml",
                   'model = "../models/m.gguf"\nprompt = "../sys.txt"\n[distill]\nprompts = "../data/prompts.txt"\n'
                   'out = "/abs/out"\nchecks = "~/c.toml"\nteacher = "org/teacher"\n'
                   '[eval]\nprompts = "eval"\nood = "ood"\nreport = "report"\n')
    s = load_settings(config, "distill")
    assert s["model"] == str(folder / "ci" / "../models/m.gguf")
    assert s["prompt"] == folder / "ci" / "../sys.txt"
    assert s["prompts"] == str(folder / "ci" / "../data/prompts.txt")
    assert s["out"] == Path("/abs/out") and s["checks"] == Path("~/c.toml").expanduser()
    assert s["teacher"] == "org/teacher"  # a hub id stays a hub id
    e = load_settings(config, "eval")
    assert e["prompts"] == "eval" and e["ood"] == "ood"  # bundled set names stay names
    assert e["report"] == folder / "ci" / "report"
    assert "steps" not in e and "out" not in e


def test_eval_takes_shared_keys_its_table_and_distills_out(tmp_path):
    config = write(tmp_path / "promptbake.toml", 'model = "org/name"\nprompt = "sys.txt"\nseed = 3\n'
                   '[distill]\nout = "baked"\nsteps = 5\n[eval]\nmax_prompts = 8\nmin_gap_closed = 0.25\n')
    e = load_settings(config, "eval")
    assert e == {"model": "org/name", "prompt": tmp_path / "sys.txt", "seed": 3, "max_prompts": 8,
                 "min_gap_closed": 0.25, "baked": tmp_path / "baked"}
    EvalConfig(**e).validate()
    c = load_settings(config, "chat")
    assert c["baked"] == tmp_path / "baked" and "max_prompts" not in c
    assert load_settings(config, "plan") == load_settings(config, "distill")


def assert_one_error(result, message: str, code: int = 2):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert message in result.stderr.replace("\n", " "), result.stderr


ERRORS = [
    ("[distill]\nbach_size = 4\n", "unknown key `bach_size` in [distill]; did you mean `batch_size`?"),
    ("stepz = 4\n", "unknown key `stepz` at the top level; did you mean `steps`?"),
    ("[distil]\nsteps = 4\n", "unknown table [distil]; did you mean [distill]?"),
    ("[distill]\nood = \"x\"\n", "unknown key `ood` in [distill]; it is an option of eval, so it goes under [eval]."),
    ("[distill]\nsteps = \"8\"\n", '[distill] `steps` must be an integer (got the string "8").'),
    ("[distill]\nlr = true\n", "[distill] `lr` must be a number (got a boolean true)."),
    ("[distill]\nprefix_reuse = 1\n", "[distill] `prefix_reuse` must be true or false (got an integer 1)."),
    ("[distill]\nquant = \"5bit\"\n", "[distill] `quant` must be one of auto, 4bit, 8bit, none (got '5bit')."),
    ("[distill]\nlr-schedule = \"linear\"\n",
     "[distill] `lr_schedule` must be one of constant, cosine (got 'linear')."),
    ("[distill]\nprompts = [\"a\"]\n", "[distill] `prompts` must be a string (got an array )."),
    ("model = \"a\"\n[distill]\nsteps = 4\nsteps = 5\n",
     "is not valid TOML: line 4, column 10: `steps` is given twice; keep one."),
    ("[distill]\nsteps = \n", "is not valid TOML: line 2, column 9: invalid value"),
    ("[distill]\nbatch_size = 2\nbatch-size = 3\n",
     "`batch_size` is given twice in [distill] (as `batch_size` and `batch-size`); keep one."),
    ("batch_size = 2\n[distill]\nbatch_size = 3\n",
     "`batch_size` is given twice, at the top level and in [distill]; keep one."),
    ("[distill]\noverwrite = true\n", "unknown key `overwrite` in [distill]; pass --overwrite on the command line"),
    ("eval = false\n", "`eval` at the top level is the [eval] table; to skip distill's closing evaluation put "
                       "`eval = false` under [distill]."),
    ("[eval]\nsteps = 3\n", "unknown key `steps` in [eval]; it is an option of distill, so it goes under [distill]."),
]


@pytest.mark.parametrize("text, message", ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_config_errors_are_one_line(tmp_path, text, message):
    config = write(tmp_path / "promptbake.toml", text)
    out = tmp_path / "baked"
    result = runner.invoke(app, ["distill", "--config", str(config), "--out", str(out)])
    assert_one_error(result, f"error: --config {config}" if "valid TOML" in message else message)
    assert message in result.stderr.replace("\n", " "), result.stderr
    assert not out.exists()


def test_config_that_is_missing_a_folder_or_not_utf8(tmp_path):
    r = runner.invoke(app, ["distill", "--config", str(tmp_path / "nope.toml")])
    assert_one_error(r, f"error: --config {tmp_path / 'nope.toml'} does not exist.")
    r = runner.invoke(app, ["eval", "--config", str(tmp_path)])
    assert_one_error(r, f"error: --config {tmp_path} is a folder; give a TOML file such as")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('model = "caf\xe9"\n'.encode("latin-1"))
    r = runner.invoke(app, ["chat", "--config", str(bad)])
    assert_one_error(r, f"error: --config {bad} is not UTF-8 text (byte 12); save it as UTF-8.")


def test_file_values_are_validated_like_flags(tmp_path):
    config = write(tmp_path / "promptbake.toml", 'model = "org/name"\nprompt = "sys.txt"\n[distill]\nsteps = 0\n')
    r = runner.invoke(app, ["distill", "--config", str(config)])
    assert_one_error(r, "error: --steps must be at least 1 (got 0).")


def test_a_mistake_in_eval_fails_distill_before_the_bake(tmp_path):
    config = write(tmp_path / "promptbake.toml", 'model = "org/name"\n[eval]\nmax_promts = 3\n')
    r = runner.invoke(app, ["distill", "--config", str(config)])
    assert_one_error(r, "unknown key `max_promts` in [eval]; did you mean `max_prompts`?")


def test_required_options_missing_from_flags_and_file(tmp_path):
    config = write(tmp_path / "promptbake.toml", "[distill]\nsteps = 3\n")
    r = runner.invoke(app, ["distill", "--config", str(config)])
    assert_one_error(r, "error: --model is required: a hub id, a local model folder or a .gguf file.")


def test_resolved_settings_read_back_as_the_same_config(tmp_path):
    cfg = DistillConfig(model="org/name", prompt=tmp_path / "sys.txt", out=tmp_path / "o", steps=3, lr=1e-05,
                        min_gap_closed=0.5, lora_targets="q_proj, v_proj", overwrite=True)
    text = resolved_toml(cfg, system_sha256="ab" * 32, key="k" * 64)
    path = write(tmp_path / "elsewhere" / "promptbake.toml", text)
    again = DistillConfig(**load_settings(path, "distill"))
    assert again == DistillConfig(**{**cfg.__dict__, "overwrite": False})  # overwrite is never replayed
    assert "SHA-256 " + "ab" * 32 in text
