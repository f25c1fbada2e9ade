"""Shared fixtures: a tiny real model saved to disk, a small prompt set and a system prompt."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

PROMPTS = [
    "Why is the sky blue?", "Write a poem about the sea.", "How do I sort a list in Python?", "Say hello.",
    "Explain photosynthesis.", "What is a fox?", "Count to five.", "Name a colour.", "What is the wind?",
    "Tell me about stars.", "Is the dog lazy?", "What do pirates say?",
]
SECRET = "Talk like a pirate. Codeword ZEBRA-PLUM-7731."


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    import torch
    from tiny import save_tiny

    # Tiny matrices gain nothing from threads, and on a shared 2-core machine a second thread
    # makes every matmul wait for a busy core: one thread runs these bakes ~20x faster here.
    torch.set_num_threads(1)

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    """(system prompt file, prompt set file) for quick bakes: 12 prompts, 4 of them held out."""
    folder = tmp_path_factory.mktemp("inputs")
    system = folder / "system.txt"
    system.write_text(SECRET + "\n", encoding="utf-8")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return system, prompts
