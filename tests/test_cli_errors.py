"""Every bad input: one clear line, a non-zero exit, no traceback, nothing written."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

import tiny
from promptbake.cli import app

runner = CliRunner()


def distill(model, prompt, out, *extra, env=None):
    args = ["distill", "--model", str(model), "--prompt", str(prompt), "--out", str(out), *map(str, extra)]
    return runner.invoke(app, args, env=env)


def assert_clean_error(result, message, out, code=2):
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in result.stderr.replace("\n", " "), result.stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.fixture
def out(tmp_path):
    return tmp_path / "baked"


def test_missing_prompt_file(tiny_dir, tmp_path, out):
    r = distill(tiny_dir, tmp_path / "nope.txt", out)
    assert_clean_error(r, f"error: system prompt file {tmp_path / 'nope.txt'} does not exist.", out)


def test_empty_prompt_file(tiny_dir, tmp_path, out):
    (tmp_path / "empty.txt").write_text("  \n\n")
    assert_clean_error(distill(tiny_dir, tmp_path / "empty.txt", out),
                       f"system prompt file {tmp_path / 'empty.txt'} is empty.", out)


def test_non_utf8_prompt_file(tiny_dir, tmp_path, out):
    (tmp_path / "latin1.txt").write_bytes("Réponds en français.".encode("latin-1"))
    assert_clean_error(distill(tiny_dir, tmp_path / "latin1.txt", out),
                       f"system prompt file {tmp_path / 'latin1.txt'} is not UTF-8 text (bad byte at offset 1).", out)


def test_empty_prompt_set(tiny_dir, sys_prompt, tmp_path, out):
    (tmp_path / "none.txt").write_text("# only a comment\n\n")
    r = distill(tiny_dir, sys_prompt, out, "--prompts", tmp_path / "none.txt")
    assert r.exit_code == 2 and "holds no prompts" in r.stderr and not out.exists()


def test_malformed_jsonl_names_the_line(tiny_dir, sys_prompt, tmp_path, out):
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "fine"}\n{"prompt": oops}\n')
    r = distill(tiny_dir, sys_prompt, out, "--prompts", tmp_path / "p.jsonl")
    assert_clean_error(r, f"{tmp_path / 'p.jsonl'}, line 3: not valid JSON", out)


def test_model_path_does_not_exist(sys_prompt, tmp_path, out):
    assert_clean_error(distill(tmp_path / "missing-model", sys_prompt, out),
                       f"model path {tmp_path / 'missing-model'} does not exist.", out)


def test_folder_that_is_not_a_model(sys_prompt, tmp_path, out):
    (tmp_path / "empty-folder").mkdir()
    assert_clean_error(distill(tmp_path / "empty-folder", sys_prompt, out),
                       "has no config.json, so it isn't a Hugging Face model.", out)


def test_hub_id_unreachable_fails_fast(sys_prompt, out, monkeypatch):
    # No network here, and an endpoint that can't resolve makes that true anywhere.
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://hub.promptbake-test.invalid")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    r = distill("someorg/some-model", sys_prompt, out)
    assert_clean_error(r, "can't reach hub.promptbake-test.invalid to download model someorg/some-model, and it is "
                          "not in the local cache; pass a local folder or .gguf file instead.", out)


def test_hub_id_with_offline_mode(sys_prompt, out, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    r = distill("someorg/some-model", sys_prompt, out)
    assert_clean_error(r, "model someorg/some-model is not in the local Hugging Face cache and HF_HUB_OFFLINE=1", out)


def test_teacher_tokenizer_mismatch(tiny_dir, sys_prompt, tmp_path, out, monkeypatch):
    monkeypatch.setattr(tiny, "CORPUS", tiny.CORPUS[:4])  # a different BPE vocabulary
    teacher = tmp_path / "teacher"
    tok = tiny.build_tokenizer()
    tok.save_pretrained(teacher)
    tiny.build_model(len(tok)).save_pretrained(teacher)
    r = distill(tiny_dir, sys_prompt, out, "--teacher", teacher, "--steps", 1)
    assert_clean_error(r, "teacher and student tokenizers differ: vocab size 379 vs 400; the teacher must share the student's tokenizer.", out)


def test_system_prompt_too_long_for_context(tiny_dir, tmp_path, out):
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("Always answer like a pirate and mention the sea. " * 60)
    r = distill(tiny_dir, long_prompt, out, "--max-new-tokens", 64)
    assert_clean_error(r, "with --max-new-tokens 64 that exceeds the model's context of 512 tokens", out)
    assert "never truncates the system prompt" in r.stderr


def test_out_exists_without_overwrite(tiny_dir, sys_prompt, tmp_path):
    out = tmp_path / "baked"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = distill(tiny_dir, sys_prompt, out)
    assert r.exit_code == 2
    assert f"error: --out {out} already exists; pass --overwrite to replace it" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("option, value, message", [
    ("--steps", 0, "--steps must be at least 1 (got 0)."),
    ("--batch-size", -2, "--batch-size must be at least 1 (got -2)."),
    ("--lr", -1, "--lr must be a positive number (got -1.0)."),
    ("--lr", "nan", "--lr must be a positive number (got nan)."),
    ("--temperature", -0.5, "--temperature must be 0 (greedy) or positive (got -0.5)."),
    ("--top-p", 1.5, "--top-p must be in (0, 1] (got 1.5)."),
    ("--kl-topk", -3, "--kl-topk must be 0 (full vocabulary) or a positive K (got -3)."),
    ("--holdout", 1.0, "--holdout must be a fraction between 0 and 1 (got 1.0)."),
])
def test_invalid_numeric_options(tiny_dir, sys_prompt, out, option, value, message):
    assert_clean_error(distill(tiny_dir, sys_prompt, out, option, value), f"error: {message}", out)


def test_topk_larger_than_vocab(tiny_dir, sys_prompt, out):
    r = distill(tiny_dir, sys_prompt, out, "--kl-topk", 100000)
    assert_clean_error(r, "--kl-topk 100000 is larger than the vocabulary", out)


def test_quant_without_bitsandbytes(tiny_dir, sys_prompt, out, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    r = distill(tiny_dir, sys_prompt, out, "--quant", "4bit")
    assert_clean_error(r, "--quant 4bit needs bitsandbytes, which can't be loaded here", out)
    assert "use --quant none" in r.stderr


def test_unknown_lora_target(tiny_dir, sys_prompt, out):
    r = distill(tiny_dir, sys_prompt, out, "--lora-targets", "not_a_module", "--steps", 1)
    assert_clean_error(r, "--lora-targets not_a_module:", out)


def test_cli_start_up_imports_no_heavy_modules():
    """`promptbake --help` and input checks stay fast because torch & co. load only inside commands."""
    code = ("import sys, promptbake.cli; heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', "
            "'datasets') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    result = subprocess.run([sys.executable, "-m", "promptbake", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "distill" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["eval", "--sampler", "quick"], "Invalid value for '--sampler': 'quick' is not one of 'exact', 'fast'."),
    (["distill", "--quant", "bad"], "Invalid value for '--quant': 'bad' is not one of 'auto', '4bit', '8bit', 'none'."),
    (["distill", "--steps", "abc"], "Invalid value for '--steps': 'abc' is not a whole number"),
    (["distill", "--lr=x"], "Invalid value for '--lr': 'x' is not a number"),
    (["distill", "--no-such-option"], "No such option: --no-such-option ("),
    (["distill", "--stesp", "3"], "No such option: --stesp. Did you mean --steps? ("),
    (["distill", "--bogus"], "No such option: --bogus ("),  # no far-fetched guess (click offered --out)
    (["distill", "--record-prompt=yes"], "Option '--record-prompt' does not take a value. (see: promptbake distill"),
    (["bake"], "No such command 'bake'."),
    (["--no-such-option"], "No such option: --no-such-option"),
])
def test_a_refused_command_line_is_one_error_line(args, message, tmp_path):
    """click's own refusals (a value not among the choices, of the wrong type, an unknown option or
    command) read like promptbake's: one `error:` line naming the option and where the help is, exit 2."""
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert result.stderr.rstrip().endswith("--help)") and "╭" not in result.stderr


def test_version_needs_no_command():
    from promptbake import __version__

    for args in (["--version"], ["--version", "distill"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and result.stdout == f"{__version__}\n", result.output
