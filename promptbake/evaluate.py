"""`evaluate`: measure what a bake did, with the three systems side by side.

    baked   - the merged checkpoint, no system prompt (what will be deployed)
    teacher - the base model with the system prompt (what the bake imitates)
    base    - the base model without it (where the bake started)

All three answer the same prompts with the same sampling seed. The report holds
fidelity (per-token KL to the teacher, and the share of the base's gap the bake
closed), behaviour-check pass rates, drift on unrelated prompts (KL(baked || base)),
and a few answers side by side. `distill` runs a short version at the end of a bake;
`promptbake chat` uses the same three systems to answer one message.

torch and transformers are imported inside functions, so input errors answer fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from .checks import Check, find_checks
from .config import DistillConfig, _opt, check_thresholds, flag
from .data import Messages, PromptSet, load_prompts, read_system_prompt
from .errors import InputError
from .models import ModelSource, resolve_model

SYSTEMS = ("baked", "teacher", "base")
DISTILL_EVAL_PROMPTS = 16  # the short evaluation at the end of `distill`
SHOWN_SAMPLES = 3  # prompts shown side by side in the terminal and eval.md


@dataclass
class EvalConfig:
    # What to compare.
    baked: Path = _opt(None, "The baked checkpoint folder (the --out of promptbake distill).")
    model: str = _opt(None, "The base model the bake started from: a hub id, a local model folder or a .gguf file.")
    prompt: Path = _opt(None, "The system prompt file that was baked in (the teacher gets it).")
    prompts: str = _opt("eval", "Held-out user prompts: a bundled set name (eval, default, ood) or a .txt/.jsonl file.")
    ood: str = _opt("ood", "Unrelated prompts to measure drift on: a bundled set name or a .txt/.jsonl file.")
    checks: Path | None = _opt(
        None, "Checks file (TOML). Default: NAME.checks.toml beside --prompt, if there is one."
    )
    report: Path | None = _opt(None, "Folder to write eval.json, eval.md and plots into (created if missing).")

    # Sampling.
    max_prompts: int = _opt(32, "Prompts used from each set, spread evenly across it.")
    max_new_tokens: int = _opt(64, "Longest sampled response, in tokens.")
    temperature: float = _opt(1.0, "Sampling temperature, the same for all three systems (0 = greedy).")
    seed: int = _opt(0, "Sampling seed, the same for all three systems.")
    batch_size: int = _opt(8, "Prompts sampled and scored at a time.")
    chunk_size: int = _opt(256, "Response tokens per chunk through the LM head (bounds memory).")

    # Quality gates: exit code 4 when one is missed.
    min_gap_closed: float | None = _opt(
        None, "Fail if the bake closes less than this fraction of the base-to-teacher reverse-KL gap."
    )
    min_pass_rate: float | None = _opt(
        None, "Fail if a check's baked pass rate is below this fraction of the teacher's."
    )
    max_drift: float | None = _opt(None, "Fail if KL(baked || base) per token on the drift prompts is above this.")

    # Templates and trust.
    chat_template: Path | None = _opt(None, "Jinja chat template file, for tokenizers that have none.")
    trust_remote_code: bool = _opt(False, "Allow the model repository to run its own Python code.")
    allow_pickle: bool = _opt(False, "Accept a base model whose weights exist only as pickle (pytorch_model.bin).")

    def validate(self) -> None:
        for name in ("baked", "model", "prompt"):
            if not getattr(self, name):
                raise InputError(f"{flag(name)} is required.")
        for name in ("max_prompts", "max_new_tokens", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{flag(name)} must be at least 1 (got {getattr(self, name)}).")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"--temperature must be 0 (greedy) or positive (got {self.temperature}).")
        check_thresholds(self.min_gap_closed, self.min_pass_rate, self.max_drift)
        if self.report is not None and Path(self.report).exists() and not Path(self.report).is_dir():
            raise InputError(f"--report {self.report} exists and is a file; choose a folder path.")

    def to_record(self) -> dict[str, Any]:
        """JSON-safe settings for eval.json (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# ---------------------------------------------------------------- figures


@dataclass
class KL:
    """A mean per-token KL and what it was measured on."""

    value: float
    prompts: int
    tokens: int

    def to_json(self) -> dict:
        return {"value": round(self.value, 6), "prompts": self.prompts, "tokens": self.tokens}


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
                "forward_gap_closed": _round(self.forward_gap_closed),
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


def token_kl(p_hidden, q_hidden, p_head, q_head, *, chunk_size: int):
    """(N,) per-token KL(p || q) = sum_v p(v) (log p(v) - log q(v)), exact over the vocabulary.

    p is the distribution the response tokens were sampled from. Only `chunk_size`
    rows of logits exist at a time for each model.

    Args:
        p_hidden, q_hidden: (N, H) final hidden states predicting the same N response tokens.
        p_head, q_head: (n, H) -> (n, V) logits.
    """
    import torch

    from .losses import token_reverse_kl

    out = []
    with torch.no_grad():
        for i in range(0, p_hidden.shape[0], chunk_size):
            out.append(token_reverse_kl(p_head(p_hidden[i : i + chunk_size]), q_head(q_hidden[i : i + chunk_size])))
    return torch.cat(out) if out else p_hidden.new_zeros(0, dtype=torch.float32)


def apply_gates(report: EvalReport, *, min_gap_closed=None, min_pass_rate=None, max_drift=None) -> list[Gate]:
    """Compare the report with the thresholds that were set; one Gate per threshold (per check for pass rates)."""
    gates = []
    if min_gap_closed is not None:
        gap = report.gap_closed
        ok = gap is not None and gap >= min_gap_closed
        if gap is None:
            msg = "gap closed can't be measured: the system prompt doesn't change the base model (KL 0)"
        else:
            msg = f"gap closed {gap:.1%} {'>=' if ok else 'is below'} --min-gap-closed {min_gap_closed:g}"
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


# ---------------------------------------------------------------- the three systems


class Systems:
    """The baked checkpoint and the base model, and the three ways of asking them a question."""

    def __init__(self, baked_lm, base_lm, renderer, *, vocab: int, max_new_tokens: int, temperature: float,
                 batch_size: int = 8, chunk_size: int = 256):
        from .pair import eos_token_ids

        self.baked_lm, self.base_lm, self.renderer, self.tok = baked_lm, base_lm, renderer, renderer.tok
        self.vocab, self.batch_size, self.chunk_size = vocab, batch_size, chunk_size
        self.gen_kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0,
                               eos_ids=eos_token_ids(self.tok, base_lm), pad_id=self.tok.pad_token_id)

    def _view(self, system: str, prompts: list[Messages]):
        """The causal LM and input ids that make up `system`."""
        if system == "baked":
            return self.baked_lm, [self.renderer.student_ids(m) for m in prompts]
        if system == "teacher":
            return self.base_lm, [self.renderer.teacher_ids(m) for m in prompts]
        return self.base_lm, [self.renderer.student_ids(m) for m in prompts]

    def sample(self, system: str, prompts: list[Messages], seed: int) -> list[list[int]]:
        """One response per prompt; every system starts from the same generator seed."""
        import torch

        from .sampling import sample

        lm, ids = self._view(system, prompts)
        gen = torch.Generator(lm.device).manual_seed(seed)
        out = []
        for i in range(0, len(ids), self.batch_size):
            out += sample(lm, ids[i : i + self.batch_size], generator=gen, **self.gen_kwargs)
        return out

    def kl(self, p: str, q: str, prompts: list[Messages], responses: list[list[int]]) -> KL:
        """Mean per-token KL(p || q) on `responses` (which should be samples from p)."""
        import torch

        from .scoring import logits_fn, response_hidden

        (p_lm, p_ids), (q_lm, q_ids) = self._view(p, prompts), self._view(q, prompts)
        p_head, q_head = logits_fn(p_lm, self.vocab), logits_fn(q_lm, self.vocab)
        pad, B = self.tok.pad_token_id, self.batch_size
        total, tokens = 0.0, 0
        for i in range(0, len(prompts), B):
            rows = responses[i : i + B]
            with torch.no_grad():
                hp = response_hidden(p_lm, p_ids[i : i + B], rows, pad)  # (N, H)
                hq = response_hidden(q_lm, q_ids[i : i + B], rows, pad)  # (N, H)
            kl = token_kl(hp, hq, p_head, q_head, chunk_size=self.chunk_size)  # (N,)
            total, tokens = total + kl.double().sum().item(), tokens + kl.numel()
        return KL(total / max(tokens, 1), len(prompts), tokens)

    def text(self, responses: list[list[int]]) -> list[str]:
        return [self.tok.decode(r, skip_special_tokens=True).strip() for r in responses]


def resolve_baked(path: Path, what: str = "--baked") -> ModelSource:
    """The baked checkpoint folder, checked for a config and weights before anything loads."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist; give the --out folder of promptbake distill.")
    if not path.is_dir():
        raise InputError(f"{what} {path} is a file; give the checkpoint folder promptbake distill wrote.")
    if not (path / "config.json").is_file():
        raise InputError(f"{what} {path} is not a checkpoint (no config.json); give the --out folder of "
                         "promptbake distill.")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise InputError(f"{what} {path} has a config.json but no weights (*.safetensors); the bake may not "
                         "have finished.")
    return ModelSource(str(path), str(path))


def check_same_base(baked_dir: Path, baked_config, base_config, model: str, what: str = "--baked") -> None:
    """Refuse a baked folder whose architecture or vocabulary differs from --model's.

    Compares `model_type` rather than `architectures`: a config read from a .gguf file has no
    `architectures`, while the merged checkpoint's config.json names the class.
    """
    def describe(config):
        return config.model_type, config.get_text_config().vocab_size

    baked, base = describe(baked_config), describe(base_config)
    record_file = Path(baked_dir) / "promptbake.json"
    record = {}
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{what} {baked_dir}: promptbake.json is not valid JSON.") from None
    if baked != base or record.get("vocab_size", base[1]) != base[1]:
        origin = f" (promptbake.json says it was baked from {record['base_model']})" if record.get("base_model") else ""
        raise InputError(
            f"{what} {baked_dir} is a {baked[0]} model with a {baked[1]}-token vocabulary but --model {model} is a "
            f"{base[0]} model with {base[1]}{origin}; pass the --model the bake started from."
        )


def load_systems(baked: Path, model: str, system_prompt: str, *, max_new_tokens: int, temperature: float,
                 batch_size: int = 8, chunk_size: int = 256, chat_template: Path | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False, console: Console,
                 what: str = "--baked") -> Systems:
    """Load the base model (for teacher and base) and the baked checkpoint, after checking they match."""
    from .bake import _read_template, quiet_libraries

    template = _read_template(chat_template)
    baked_src = resolve_baked(baked, what)
    src = resolve_model(model, allow_pickle=allow_pickle)
    quiet_libraries()
    from .models import load_config, load_model, load_tokenizer, pick_device_and_dtype
    from .render import Renderer

    base_config = load_config(src, trust_remote_code=trust_remote_code)
    baked_config = load_config(baked_src, trust_remote_code=trust_remote_code)
    check_same_base(Path(baked), baked_config, base_config, model, what)
    tok = load_tokenizer(src, chat_template=template, trust_remote_code=trust_remote_code)
    renderer = Renderer(tok, system_prompt, model)
    device, dtype = pick_device_and_dtype()
    console.print(f"loading {model} and {baked} ({device.type}, {str(dtype).removeprefix('torch.')})", markup=False)
    kw = dict(quant="none", device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    base_lm = load_model(src, **kw)
    baked_lm = load_model(baked_src, **kw)
    return Systems(baked_lm, base_lm, renderer, vocab=base_config.get_text_config().vocab_size,
                   max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                   chunk_size=chunk_size)


# ---------------------------------------------------------------- the evaluation


def spread(prompts: list, n: int) -> list:
    """At most n items, evenly spaced through the list (sets are grouped by kind, so not just the first n)."""
    if len(prompts) <= n:
        return list(prompts)
    return [prompts[i * len(prompts) // n] for i in range(n)]


def measure(sy: Systems, prompts: list[Messages], ood: list[Messages], checks: list[Check], *, seed: int,
            console: Console) -> dict:
    """Sample the three systems on `prompts` (and the baked one on `ood`); return every figure of a report."""
    responses = {}
    for name in SYSTEMS:
        t0 = time.perf_counter()
        with console.status(f"sampling {name} on {len(prompts)} prompts"):
            responses[name] = sy.sample(name, prompts, seed)
        n_tok = sum(len(r) for r in responses[name])
        console.print(f"sampled {name}: {len(prompts)} responses, {n_tok} tokens, {time.perf_counter() - t0:.0f} s")
    with console.status("scoring"):
        reverse = {s: sy.kl(s, "teacher", prompts, responses[s]) for s in ("baked", "base")}
        forward = {s: sy.kl("teacher", s, prompts, responses["teacher"]) for s in ("baked", "base")}
    texts = {s: sy.text(responses[s]) for s in SYSTEMS}
    rates = [CheckRates(c, {s: sum(c.passes(t) for t in texts[s]) for s in SYSTEMS}, len(prompts)) for c in checks]
    drift = None
    if ood:
        with console.status(f"sampling baked on {len(ood)} drift prompts"):
            ood_responses = sy.sample("baked", ood, seed)
            drift = sy.kl("baked", "base", ood, ood_responses)
    samples = [{"prompt": m[-1]["content"], **{s: texts[s][i] for s in SYSTEMS}} for i, m in enumerate(prompts)]
    return dict(reverse_kl=reverse, forward_kl=forward, checks=rates, drift=drift, samples=samples)


def evaluate(cfg: EvalConfig, console: Console | None = None) -> EvalReport:
    """Compare baked, teacher and base on cfg.prompts; write cfg.report if set. Gates are in report.gates."""
    console = console or Console(stderr=True)
    cfg.validate()
    system = read_system_prompt(cfg.prompt)
    checks = _checks(cfg.checks, cfg.prompt, cfg.min_pass_rate)
    prompts = spread(load_prompts(cfg.prompts), cfg.max_prompts)
    ood = spread(load_prompts(cfg.ood), cfg.max_prompts)
    if not checks:
        console.print(f"[yellow]note:[/] no checks file; pass --checks FILE or put {Path(cfg.prompt).stem}.checks.toml "
                      f"beside {cfg.prompt} to measure behaviour.")

    sy = load_systems(cfg.baked, cfg.model, system, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      batch_size=cfg.batch_size, chunk_size=cfg.chunk_size, chat_template=cfg.chat_template,
                      trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, console=console)
    prompts, ood = _fit(prompts, sy, cfg.max_new_tokens, console), _fit(ood, sy, cfg.max_new_tokens, console)
    figures = measure(sy, prompts, ood, checks, seed=cfg.seed, console=console)
    report = EvalReport(str(cfg.baked), cfg.model, _sha256(system), **figures, settings=cfg.to_record())
    report.gates = apply_gates(report, min_gap_closed=cfg.min_gap_closed, min_pass_rate=cfg.min_pass_rate,
                               max_drift=cfg.max_drift)
    if cfg.report is not None:
        write_report(report, Path(cfg.report), Path(cfg.baked) / "metrics.jsonl", console)
    return report


def after_distill(cfg: DistillConfig, folder: Path, heldout: list[Messages], checks: list[Check],
                  console: Console) -> EvalReport:
    """The short evaluation `distill` runs on its merged checkpoint: up to 16 held-out prompts, no drift."""
    console.print(f"evaluating the merged checkpoint on {min(len(heldout), DISTILL_EVAL_PROMPTS)} held-out prompts")
    system = read_system_prompt(cfg.prompt)
    sy = load_systems(folder, cfg.model, system, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      batch_size=cfg.batch_size, chunk_size=cfg.chunk_size, chat_template=cfg.chat_template,
                      trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, console=console)
    figures = measure(sy, spread(heldout, DISTILL_EVAL_PROMPTS), [], checks, seed=cfg.seed, console=console)
    settings = {"prompts": "held-out", "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "seed": cfg.seed, "checks": str(cfg.checks) if cfg.checks else None}
    report = EvalReport(str(cfg.out), cfg.model, _sha256(system), **figures, settings=settings)
    report.gates = apply_gates(report, min_gap_closed=cfg.min_gap_closed, min_pass_rate=cfg.min_pass_rate)
    print_report(report, console, samples=0)
    return report


def find_eval_checks(cfg: DistillConfig) -> list[Check]:
    """The checks distill's evaluation will run, loaded up front so a bad file fails before the bake."""
    return _checks(cfg.checks, cfg.prompt, cfg.min_pass_rate) if cfg.eval else []


def _checks(checks: Path | None, prompt: Path, min_pass_rate: float | None) -> list[Check]:
    found = find_checks(checks, prompt)
    if min_pass_rate is not None and not found:
        raise InputError(f"--min-pass-rate needs checks: give --checks FILE or put "
                         f"{Path(prompt).stem}.checks.toml beside {prompt}.")
    return found


def _fit(prompts: list[Messages], sy: Systems, max_new: int, console: Console) -> list[Messages]:
    from .bake import _fit_context
    from .models import context_length

    kept = _fit_context(PromptSet("eval", prompts, len(prompts)), sy.renderer, context_length(sy.base_lm.config),
                        max_new)
    if kept.dropped:
        console.print(f"[yellow]note:[/] dropped {kept.drop_summary()} prompt(s).")
    return kept.prompts


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _round(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(x, n)


# ---------------------------------------------------------------- output


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}".replace("-0%", "0%")


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
    fid.add_row("KL(x ‖ teacher)", f"{r['baked'].value:.4f}", f"{r['base'].value:.4f}", _pct(report.gap_closed),
                f"own samples: {r['baked'].prompts} prompts, {r['baked'].tokens} + {r['base'].tokens} tokens")
    fid.add_row("KL(teacher ‖ x)", f"{f['baked'].value:.4f}", f"{f['base'].value:.4f}",
                _pct(report.forward_gap_closed), f"teacher samples: {f['baked'].prompts} prompts, "
                f"{f['baked'].tokens} tokens")
    console.print(fid)
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
        f"| KL(x ‖ teacher) | {r['baked'].value:.4f} | {r['base'].value:.4f} | {_pct(report.gap_closed)} | "
        f"each system's own samples: {r['baked'].prompts} prompts, {r['baked'].tokens} + {r['base'].tokens} tokens |",
        f"| KL(teacher ‖ x) | {f['baked'].value:.4f} | {f['base'].value:.4f} | {_pct(report.forward_gap_closed)} | "
        f"teacher samples: {f['baked'].prompts} prompts, {f['baked'].tokens} tokens |", "",
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
    from .output import write_json

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


# ---------------------------------------------------------------- chat


def answer(sy: Systems, message: str, seed: int = 0) -> dict[str, str]:
    """One user message to the three systems; their answers by system name."""
    prompt = [{"role": "user", "content": message}]
    return {s: sy.text(sy.sample(s, [prompt], seed))[0] for s in SYSTEMS}


def print_answers(answers: dict[str, str], console: Console) -> None:
    from rich.table import Table
    from rich.text import Text

    tab = Table(show_lines=True, expand=True)
    for s in SYSTEMS:
        tab.add_column(s, ratio=1, overflow="fold")
    tab.add_row(*(Text(answers[s]) for s in SYSTEMS))
    console.print(tab)
