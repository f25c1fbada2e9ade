"""Shared by the CI tests: one short tiny-model bake made through a config file, reused by several modules.

Import the fixture into a test module (`from ci_bakes import ci_bake  # noqa: F401`); it is
session-scoped, so the bake runs once however many modules use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptbake.cli import app

# Small and quick: 2 steps of 2 prompts, 8 new tokens, closing evaluation on the held-out prompts.
SETTINGS = {"steps": 2, "batch_size": 2, "max_new_tokens": 8, "holdout": 0.3, "lr": 3e-3}


def write_config(path: Path, model: Path, system: Path, prompts: Path, **extra) -> Path:
    """A promptbake.toml with shared keys at the top and a [distill] table."""
    distill = {**SETTINGS, **extra}
    lines = [f'model = "{model}"', f'prompt = "{system}"', "", "[distill]", f'prompts = "{prompts}"',
             'out = "baked"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in distill.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@dataclass
class Bake:
    config: Path
    out: Path
    stdout: str  # distill --json's answer
    record: dict


@pytest.fixture(scope="session")
def ci_bake(tiny_model, prompt_files, tmp_path_factory) -> Bake:
    folder = tmp_path_factory.mktemp("ci")
    system, prompts = prompt_files
    config = write_config(folder / "promptbake.toml", tiny_model, system, prompts)
    result = invoke("distill", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    out = folder / "baked"  # relative to the config file's folder, not the working directory
    return Bake(config, out, result.stdout, json.loads((out / "promptbake.json").read_text()))
