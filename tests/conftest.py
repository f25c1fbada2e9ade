from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import tiny  # noqa: E402

PIRATE = "You are a pirate. Always talk like a pirate: say arr, matey and ahoy in every answer."


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint with a ChatML tokenizer, saved like a hub model."""
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_nosystem_dir(tmp_path_factory) -> Path:
    """The same kind of model, but its chat template rejects system messages."""
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny_nosys") / "model", template=tiny.NO_SYSTEM)


@pytest.fixture
def sys_prompt(tmp_path) -> Path:
    path = tmp_path / "sys.txt"
    path.write_text(PIRATE, encoding="utf-8")
    return path


@pytest.fixture
def prompt_set(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(tiny.CORPUS + [f"Tell me fact number {i} about the sea." for i in range(12)]) + "\n")
    return path
