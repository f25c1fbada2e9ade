"""Evaluation: how close a baked checkpoint comes to the prompted teacher, and quality gates on it.

    systems.py  the three systems compared (baked, prompted teacher, base) and how they load
    measure.py  samples, KL both ways, behaviour checks, drift
    report.py   the report's types, the gates, and its terminal / markdown / plot forms
    run.py      `evaluate` (promptbake eval) and `evaluate_bake` (the end of promptbake distill)
    chat.py     promptbake chat: one message to the three systems

It shares setup code with the bake (setup.py) and never imports the bake itself.
"""

from .report import (KL, SYSTEMS, CheckRates, EvalReport, Gate, apply_gates, gap_closed, gap_closed_stderr, markdown,
                     print_report)
from .run import evaluate, evaluate_bake

__all__ = ["KL", "SYSTEMS", "CheckRates", "EvalReport", "Gate", "apply_gates", "evaluate", "evaluate_bake",
           "gap_closed", "gap_closed_stderr", "markdown", "print_report"]
