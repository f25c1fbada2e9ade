"""`promptbake chat`: one message to the three systems, answers side by side."""

from __future__ import annotations

from rich.console import Console

from .report import SYSTEMS
from .systems import ComparedModels


def answer(models: ComparedModels, message: str, seed: int = 0) -> dict[str, str]:
    """One user message to the three systems; their answers by system name."""
    prompt = [{"role": "user", "content": message}]
    return {s: models.text(models.sample(s, [prompt], seed))[0] for s in SYSTEMS}


def print_answers(answers: dict[str, str], console: Console) -> None:
    from rich.table import Table
    from rich.text import Text

    tab = Table(show_lines=True, expand=True)
    for s in SYSTEMS:
        tab.add_column(s, ratio=1, overflow="fold")
    tab.add_row(*(Text(answers[s]) for s in SYSTEMS))
    console.print(tab)
