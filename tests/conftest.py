"""Shared fixtures: a tiny real model saved to disk once per test session."""

from __future__ import annotations

import pytest

from tiny import save_tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Folder of a 2-layer Llama with a ChatML tokenizer (see tests/tiny.py)."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")
