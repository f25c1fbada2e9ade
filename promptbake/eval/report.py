"""The evaluation report: its figures, the quality gates, and how it is shown (terminal, markdown, plots)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from ..checks import Check
from ..output import write_json

SYSTEMS = ("baked", "teacher", "base")
SHOWN_SAMPLES = 3  # prompts shown side by side in the terminal and eval.md


@dataclass
class KL:
    """A mean per-token KL, its standard error (prompts as the independent draws) and what it was measured on."""

    value: float
    prompts: int
    tokens: int
    stderr: float = 0.0
    # Each prompt's summed KL and response tokens, in prompt order (kept in memory, not in to_json):
    # lets a caller split the mean by answer, or compare two models prompt by prompt.
    sums: list[float] = field(default_factory=list, repr=False)
    counts: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def from_sums(cls, sums: list[float], counts: list[int]) -> KL:
        """From each prompt's summed KL and its response tokens."""
        value, stderr = per_token_mean(sums, counts)
        return cls(value, len(counts), sum(counts), stderr, list(sums), list(counts))

    def to_json(self) -> dict:
        return {"value": round(self.value, 6), "stderr": round(self.stderr, 6), "prompts": self.prompts,
                "tokens": self.tokens}


def per_token_mean(sums: list[float], counts: list[int]) -> tuple[float, float]:
    """Mean per token of per-prompt sums, and its standard error with prompts as the independent draws
    (the ratio estimator's: tokens of one response are not independent of each other)."""
    n, tokens = len(counts), sum(counts)
    if not tokens:
        return 0.0, 0.0
    mean = sum(sums) / tokens
    var = sum((s - mean * c) ** 2 for s, c in zip(sums, counts)) / max(n - 1, 1)
    return mean, math.sqrt(n * var) / tokens


def gap_closed_stderr(baked: KL, base: KL) -> float | None:
    """Standard error of gap_closed(baked, base), by the delta method on the ratio baked / base.

    The two means are taken as independent. They are measured on the same prompts, and a prompt
    that is hard for one system tends to be hard for the other; that correlation would narrow the
    error, so this one errs on the wide side."""
    if base.value <= 0:
        return None
    ratio = baked.value / base.value
    rel = (baked.stderr / baked.value) ** 2 if baked.value > 0 else 0.0
    return abs(ratio) * math.sqrt(rel + (base.stderr / base.value) ** 2)


@dataclass
class CheckRates:
    check: Check
    passed: dict[str, int]  # system -> responses that passed
    total: int  # responses per system

    def rate(self, system: str) -> float:
        return self.passed[system] / self.total if self.total else 0.0

    def to_json(self) -> dict:
        out = {"name": self.check.name, "description": self.check.description, "rule": self.check.rule,
               "responses": self.total}
        for s in SYSTEMS:
            out[s] = {"passed": self.passed[s], "rate": round(self.rate(s), 4)}
        return out


@dataclass
class Gate:
    option: str  # the CLI flag that set it
    threshold: float
    value: float | None
    passed: bool
    message: str

    def to_json(self) -> dict:
        value = None if self.value is None else round(self.value, 6)
        return {"option": self.option, "threshold": self.threshold, "value": value, "passed": self.passed,
                "message": self.message}


@dataclass
class EvalReport:
    baked: str
    model: str
    system_prompt_sha256: str
    reverse_kl: dict[str, KL]  # "baked"/"base" -> KL(x || teacher) on x's own samples
    forward_kl: dict[str, KL]  # "baked"/"base" -> KL(teacher || x) on the teacher's samples
    checks: list[CheckRates]
    drift: KL | None  # KL(baked || base) on the baked model's samples of the drift prompts
    samples: list[dict[str, str]]  # prompt, baked, teacher, base
    settings: dict = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)

    @property
    def gap_closed(self) -> float | None:
        return gap_closed(self.reverse_kl["baked"].value, self.reverse_kl["base"].value)

    @property
    def forward_gap_closed(self) -> float | None:
        return gap_closed(self.forward_kl["baked"].value, self.forward_kl["base"].value)

    @property
    def gap_closed_stderr(self) -> float | None:
        return gap_closed_stderr(self.reverse_kl["baked"], self.reverse_kl["base"])

    @property
    def forward_gap_closed_stderr(self) -> float | None:
        return gap_closed_stderr(self.forward_kl["baked"], self.forward_kl["base"])

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict:
        return {
            "baked": self.baked,
            "model": self.model,
            "system_prompt_sha256": self.system_prompt_sha256,
            "settings": self.settings,
            "fidelity": {
                "reverse_kl": {k: v.to_json() for k, v in self.reverse_kl.items()},
                "forward_kl": {k: v.to_json() for k, v in self.forward_kl.items()},
                "gap_closed": _round(self.gap_closed),
                "gap_closed_stderr": _round(self.gap_closed_stderr),
                "forward_gap_closed": _round(self.forward_gap_closed),
                "forward_gap_closed_stderr": _round(self.forward_gap_closed_stderr),
            },
            "checks": [c.to_json() for c in self.checks],
            "drift": None if self.drift is None else self.drift.to_json(),
            "gates": [g.to_json() for g in self.gates],
            "passed": self.passed,
            "samples": self.samples,
        }


def gap_closed(kl_baked: float, kl_base: float) -> float | None:
    """Share of the base model's KL to the teacher that the bake removed: 1 - baked/base (None if base is 0)."""
    return 1 - kl_baked / kl_base if kl_base > 0 else None


def _round(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(x, n)


def apply_gates(report: EvalReport, *, min_gap_closed=None, min_pass_rate=None, max_drift=None) -> list[Gate]:
    """Compare the report with the thresholds that were set; one Gate per threshold (per check for pass rates)."""
    gates = []
    if min_gap_closed is not None:
        gap = report.gap_closed
        ok = gap is not None and gap >= min_gap_closed
        if gap is None:
            msg = "gap closed can't be measured: the system prompt doesn't change the base model (KL 0)"
        else:
            se = report.gap_closed_stderr
            msg = (f"gap closed {gap:.1%}{f' ± {se:.1%}' if se else ''} {'>=' if ok else 'is below'} "
                   f"--min-gap-closed {min_gap_closed:g}")
        gates.append(Gate("--min-gap-closed", min_gap_closed, gap, ok, msg))
    if min_pass_rate is not None:
        for c in report.checks:
            baked, teacher = c.rate("baked"), c.rate("teacher")
            ok = baked >= min_pass_rate * teacher - 1e-12
            msg = (f"check {c.check.name!r}: baked passes {c.passed['baked']}/{c.total} ({baked:.0%}), "
                   f"{'at least' if ok else 'below'} --min-pass-rate {min_pass_rate:g} x teacher's "
                   f"{c.passed['teacher']}/{c.total} ({teacher:.0%})")
            gates.append(Gate("--min-pass-rate", min_pass_rate, baked / teacher if teacher else None, ok, msg))
    if max_drift is not None and report.drift is not None:
        ok = report.drift.value <= max_drift
        msg = (f"drift KL(baked || base) {report.drift.value:.4f} per token "
               f"{'<=' if ok else 'is above'} --max-drift {max_drift:g}")
        gates.append(Gate("--max-drift", max_drift, report.drift.value, ok, msg))
    return gates



def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}".replace("-0%", "0%")


def _pct_se(x: float | None, se: float | None) -> str:
    """A share with its standard error in points: '52% ± 15'."""
    return _pct(x) if x is None or not se else f"{_pct(x)} ± {100 * se:.0f}"


def _short(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def print_report(report: EvalReport, console: Console, samples: int = SHOWN_SAMPLES) -> None:
    """The report as rich tables (gates are the caller's to print: the CLI puts them on stderr)."""
    from rich.table import Table
    from rich.text import Text

    r, f = report.reverse_kl, report.forward_kl
    fid = Table(title="fidelity: per-token KL to the teacher (lower is closer)", title_justify="left")
    for col in ("", "baked", "base", "gap closed", "measured on"):
        fid.add_column(col, justify="left" if col in ("", "measured on") else "right")
    fid.add_row("KL(x ‖ teacher)", f"{r['baked'].value:.4f}", f"{r['base'].value:.4f}",
                _pct_se(report.gap_closed, report.gap_closed_stderr),
                f"own samples: {r['baked'].prompts} prompts, {r['baked'].tokens} + {r['base'].tokens} tokens")
    fid.add_row("KL(teacher ‖ x)", f"{f['baked'].value:.4f}", f"{f['base'].value:.4f}",
                _pct_se(report.forward_gap_closed, report.forward_gap_closed_stderr),
                f"teacher samples: {f['baked'].prompts} prompts, {f['baked'].tokens} tokens")
    console.print(fid)
    console.print("gap closed: ± one standard error, prompts as the draws: more prompts narrow it", style="dim")
    if report.checks:
        tab = Table(title="behaviour checks: pass rate", title_justify="left")
        tab.add_column("check")
        for s in SYSTEMS:
            tab.add_column(s, justify="right")
        for c in report.checks:
            tab.add_row(Text(c.check.name), *(f"{c.rate(s):.0%} ({c.passed[s]}/{c.total})" for s in SYSTEMS))
        console.print(tab)
    if report.drift is not None:
        d = report.drift
        console.print(f"drift on unrelated prompts: KL(baked ‖ base) {d.value:.4f} per token "
                      f"({d.prompts} prompts, {d.tokens} tokens)", highlight=False)
    if samples and report.samples:
        tab = Table(title="samples", title_justify="left", show_lines=True)
        for col in ("prompt", *SYSTEMS):
            tab.add_column(col, ratio=1, overflow="fold")
        for row in report.samples[:samples]:
            tab.add_row(*(Text(_short(row[c])) for c in ("prompt", *SYSTEMS)))
        console.print(tab)


def markdown(report: EvalReport, samples: int = SHOWN_SAMPLES) -> str:
    r, f = report.reverse_kl, report.forward_kl
    lines = [
        "# promptbake eval", "",
        f"Baked checkpoint `{report.baked}` against base `{report.model}` with and without the system prompt "
        f"(sha256 `{report.system_prompt_sha256[:12]}`).", "",
        *([f"**Gates: {'passed' if report.passed else 'FAILED'}**", ""] if report.gates else []),
        "## Fidelity", "",
        "Per-token KL to the teacher (base model with the system prompt); lower is closer.", "",
        "| | baked | base | gap closed | measured on |", "|---|---:|---:|---:|---|",
        f"| KL(x ‖ teacher) | {r['baked'].value:.4f} | {r['base'].value:.4f} | "
        f"{_pct_se(report.gap_closed, report.gap_closed_stderr)} | "
        f"each system's own samples: {r['baked'].prompts} prompts, {r['baked'].tokens} + {r['base'].tokens} tokens |",
        f"| KL(teacher ‖ x) | {f['baked'].value:.4f} | {f['base'].value:.4f} | "
        f"{_pct_se(report.forward_gap_closed, report.forward_gap_closed_stderr)} | "
        f"teacher samples: {f['baked'].prompts} prompts, {f['baked'].tokens} tokens |", "",
        "Gap closed is given ± one standard error, with the prompts as the independent draws.", "",
    ]
    if report.checks:
        lines += ["## Behaviour checks", "", "| check | baked | teacher | base |", "|---|---:|---:|---:|"]
        for c in report.checks:
            cells = " | ".join(f"{c.rate(s):.0%} ({c.passed[s]}/{c.total})" for s in SYSTEMS)
            lines.append(f"| {_md(c.check.name)} | {cells} |")
        lines.append("")
    if report.drift is not None:
        d = report.drift
        lines += ["## Drift on unrelated prompts", "",
                  f"KL(baked ‖ base) = {d.value:.4f} per token ({d.prompts} prompts, {d.tokens} tokens).", ""]
    if report.gates:
        lines += ["## Gates", ""] + [f"- {'passed' if g.passed else '**failed**'}: {_md(g.message)}"
                                     for g in report.gates] + [""]
    if report.samples and samples:
        lines += ["## Samples", "", "| prompt | baked | teacher | base |", "|---|---|---|---|"]
        for row in report.samples[:samples]:
            lines.append("| " + " | ".join(_md(_short(row[c], 400)) for c in ("prompt", *SYSTEMS)) + " |")
        lines.append("")
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(report: EvalReport, folder: Path, metrics: Path, console: Console) -> None:
    """eval.json, eval.md and, when matplotlib is installed, the plots."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "eval.json", report.to_json())
    (folder / "eval.md").write_text(markdown(report), encoding="utf-8")
    written = ["eval.json", "eval.md"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("note: plots skipped: matplotlib is not installed (pip install 'promptbake[plot]').",
                      markup=False, highlight=False)
        plt = None
    if plt is not None:
        written += plot_training_curve(plt, metrics, folder / "training_curve.png")
        written += plot_pass_rates(plt, report, folder / "check_pass_rates.png")
    console.print(f"wrote {', '.join(written)} to {folder}", markup=False, highlight=False)


def plot_training_curve(plt, metrics: Path, out: Path) -> list[str]:
    """KL per token against step, from the bake's metrics.jsonl (nothing if there is none)."""
    if not metrics.is_file():
        return []
    rows = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line from an interrupted run
        if isinstance(row, dict) and "step" in row and "kl" in row:
            rows.append(row)
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["kl"] for r in rows], marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("reverse KL per token")
    ax.set_title("training curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out.name]


def plot_pass_rates(plt, report: EvalReport, out: Path) -> list[str]:
    """Grouped bars: each check's pass rate for baked, teacher and base."""
    if not report.checks:
        return []
    n = len(report.checks)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * n + 2), 3.5))
    width = 0.27
    for k, s in enumerate(SYSTEMS):
        ax.bar([i + (k - 1) * width for i in range(n)], [c.rate(s) for c in report.checks], width, label=s)
    ax.set_xticks(range(n), [c.check.name for c in report.checks], rotation=15 if n > 2 else 0)
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass rate")
    ax.set_title(f"behaviour checks ({report.checks[0].total} responses each)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out.name]

