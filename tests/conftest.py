"""Shared fixtures: tiny real models saved to disk once per session, system prompts and prompt sets."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# .gguf conversions (promptbake/gguf_cache.py) go to a cache folder of the session's own, never the
# user's ~/.cache. Set PROMPTBAKE_CACHE yourself to keep the real models' conversions between runs.
if not os.environ.get("PROMPTBAKE_CACHE"):
    os.environ["PROMPTBAKE_CACHE"] = tempfile.mkdtemp(prefix="promptbake-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PROMPTBAKE_CACHE"], ignore_errors=True)

import tiny  # noqa: E402

PIRATE = "You are a pirate. Always talk like a pirate: say arr, matey and ahoy in every answer."
PROMPTS = [
    "Why is the sky blue?", "Write a poem about the sea.", "How do I sort a list in Python?", "Say hello.",
    "Explain photosynthesis.", "What is a fox?", "Count to five.", "Name a colour.", "What is the wind?",
    "Tell me about stars.", "Is the dog lazy?", "What do pirates say?",
]
SECRET = "Talk like a pirate. Codeword ZEBRA-PLUM-7731."


def pytest_configure(config):
    import torch

    # Tiny matrices gain nothing from a second thread, and on a busy 2-core machine every matmul
    # then waits for a core: one thread runs the tiny bakes many times faster. Tests on the real
    # SmolLM2 model raise it again (see `all_threads`).
    torch.set_num_threads(1)


@pytest.fixture
def all_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint with a ChatML tokenizer, saved like a hub model."""
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir) -> Path:
    return tiny_dir


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


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    """(system prompt file, prompt set file) for quick bakes: 12 prompts, 4 of them held out."""
    folder = tmp_path_factory.mktemp("inputs")
    system = folder / "system.txt"
    system.write_text(SECRET + "\n", encoding="utf-8")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return system, prompts
