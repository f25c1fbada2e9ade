"""The `promptbake` command: a thin layer over the library.

Options of `distill` and `eval` are generated from `DistillConfig`'s and `EvalConfig`'s
fields, so the help text lives in one place. Library errors (`PromptbakeError`)
become one red line and a non-zero exit; a missed quality gate exits with 4.
Heavy modules (torch, transformers, peft) are imported inside commands.
"""

from __future__ import annotations

import enum
import inspect
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .config import DistillConfig, flag
from .errors import InputError, PromptbakeError
from .evaluate import EvalConfig

app = typer.Typer(
    name="promptbake",
    help="Bake a system prompt into a model's weights with on-policy context distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
GATE_FAILED = 4  # exit code when a quality threshold is missed

_TYPES = {"str": str, "Path": Path, "int": int, "float": float, "bool": bool,
          "str | None": Optional[str], "Path | None": Optional[Path], "float | None": Optional[float]}


def _config_parameters(cls, required: tuple[str, ...] = ("model", "prompt")) -> list[inspect.Parameter]:
    """One typer option per config field: --flag-name, help from the field's metadata."""
    _REQUIRED = set(required)
    params = []
    for f in fields(cls):
        py_type = _TYPES[f.type]
        meta = f.metadata
        kwargs = {"help": meta["help"], "show_default": f.name not in _REQUIRED and f.default is not None}
        if meta.get("choices"):
            py_type = enum.Enum(f.name, {c: c for c in meta["choices"]}, type=str)  # typer lists the choices
        if py_type is bool:
            decls = [flag(f.name)] if not f.default else [f"{flag(f.name)}/--no-{f.name.replace('_', '-')}"]
        else:
            decls = [flag(f.name)]
        default = ... if f.name in _REQUIRED else (None if f.default is MISSING else f.default)
        if isinstance(py_type, type) and issubclass(py_type, enum.Enum):
            default = py_type(default)
        option = typer.Option(*decls, **kwargs)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[py_type, option]))
    return params


def _run(fn, *args, **kwargs):
    """Call library code; turn its errors and Ctrl-C into one line and an exit code."""
    try:
        return fn(*args, **kwargs)
    except PromptbakeError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: nothing was written.")
        raise typer.Exit(130) from None


def _options(options: dict) -> dict:
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in options.items()}


def _gates(gates: list[dict]) -> None:
    """Print each quality gate on stderr; exit with GATE_FAILED if any was missed."""
    for g in gates:
        mark = "[green]gate passed:[/]" if g["passed"] else "[bold red]gate failed:[/]"
        err_console.print(mark, escape(g["message"]), highlight=False, soft_wrap=True)
    if not all(g["passed"] for g in gates):
        raise typer.Exit(GATE_FAILED)


def distill_command(**options):
    """Bake --prompt into --model and write a merged checkpoint to --out."""
    from .bake import distill

    cfg = DistillConfig(**_options(options))
    result = _run(distill, cfg, err_console)
    _gates((result.record["results"].get("eval") or {}).get("gates", []))


distill_command.__signature__ = inspect.Signature(_config_parameters(DistillConfig))
app.command("distill", help=distill_command.__doc__)(distill_command)


def eval_command(**options):
    """Compare --baked, the prompted teacher and the base on held-out prompts; gate on the results.

    Exit codes: 0 ok, 2 bad input, 4 a --min-*/--max-* threshold was missed.
    """
    from .evaluate import evaluate, print_report

    cfg = EvalConfig(**_options(options))
    report = _run(evaluate, cfg, err_console)
    print_report(report, Console())
    _gates([g.to_json() for g in report.gates])


eval_command.__signature__ = inspect.Signature(_config_parameters(EvalConfig, required=("baked", "model", "prompt")))
app.command("eval", help=eval_command.__doc__)(eval_command)


@app.command("chat")
def chat_command(
    baked: Annotated[Path, typer.Argument(help="The baked checkpoint folder (the --out of promptbake distill).")],
    model: Annotated[str, typer.Option("--model", help="The base model the bake started from.")],
    prompt: Annotated[Path, typer.Option("--prompt", help="The system prompt file that was baked in.")],
    message: Annotated[Optional[str], typer.Option(
        "--message", help="One user message. Without it: a prompt loop on a terminal, else stdin is the message.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")] = 128,
    temperature: Annotated[float, typer.Option(
        "--temperature", help="Sampling temperature (0 = greedy: each system's most likely answer).")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed, the same for all three systems.")] = 0,
    chat_template: Annotated[Optional[Path], typer.Option(
        "--chat-template", help="Jinja chat template file, for tokenizers that have none.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="Allow the model repository to run its own Python code.")] = False,
):
    """Ask the baked model, the prompted teacher and the base the same message; show the answers side by side."""
    from .data import read_system_prompt
    from .evaluate import answer, load_systems, print_answers

    interactive = message is None and sys.stdin.isatty()
    if not interactive:
        message = _run(_one_message, message)
    if max_new_tokens < 1:
        _run(_fail, f"--max-new-tokens must be at least 1 (got {max_new_tokens}).")
    if not temperature >= 0:
        _run(_fail, f"--temperature must be 0 (greedy) or positive (got {temperature}).")
    system = _run(read_system_prompt, prompt)
    sy = _run(load_systems, baked, model, system, max_new_tokens=max_new_tokens, temperature=temperature,
              chat_template=chat_template, trust_remote_code=trust_remote_code, console=err_console,
              what="baked folder")
    out = Console()
    while True:
        if interactive:
            try:
                message = input("you> ")
            except (EOFError, KeyboardInterrupt):
                break
            if not message.strip():
                continue
        print_answers(_run(answer, sy, message.strip(), seed), out)
        if not interactive:
            break


def _one_message(message: str | None) -> str:
    """--message, or all of stdin when it isn't a terminal; never empty."""
    text = sys.stdin.read() if message is None else message
    if not text.strip():
        raise InputError("the message is empty: pass --message TEXT or pipe the text on stdin.")
    return text.strip()


def _fail(message: str):
    raise InputError(message)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
):
    if version:
        from . import __version__

        typer.echo(__version__)
        raise typer.Exit()


def entry() -> None:
    sys.exit(app())
