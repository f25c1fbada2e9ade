"""The `promptbake` command: a thin layer over the library.

The options of `distill`, `eval` and `chat` are generated from the fields of
`DistillConfig`, `EvalConfig` and `ChatConfig`, so the help text lives in one place. Library errors (`PromptbakeError`)
and click's refusals of the command line become one red line and a non-zero exit; a missed quality gate exits with 4.
Heavy modules (torch, transformers, peft) are imported inside commands.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import inspect
import json
import signal
import sys
import threading
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__, data
from .config import ChatConfig, DistillConfig, EvalConfig, flag
from .data import read_system_prompt
from .errors import InputError, Interrupted, PromptbakeError, Terminated, print_line
from .eval import evaluate, print_report
from .eval.chat import answer, print_answers
from .eval.systems import load_compared


class _OneLineRefusals(typer.core.TyperGroup):
    """click refuses a bad command line (an unknown option, a value of the wrong type or not among
    the choices) in a framed box of several lines; promptbake says it in one `error:` line, as it
    does its own refusals, and exits with click's code (2)."""

    def make_context(self, *args, **kwargs):
        with _one_line_refusal():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):  # the subcommand's own options are parsed in here
        with _one_line_refusal(ctx):
            return super().invoke(ctx)


# click's exceptions, wherever this typer takes click from (recent ones vendor it as typer._click)
_CLICK = getattr(typer.core, "_click", None) or __import__("click")
_NO_SUCH_OPTION = getattr(getattr(_CLICK, "exceptions", _CLICK), "NoSuchOption", ())


@contextlib.contextmanager
def _one_line_refusal(group_ctx=None):
    try:
        yield
    except getattr(_CLICK, "NoArgsIsHelpError", ()):
        raise  # bare `promptbake`: click prints the help
    except _CLICK.ClickException as err:
        line = _refusal_text(err)
        ctx = getattr(err, "ctx", None)
        if ctx is not None:
            line += f" (see: {ctx.command_path} --help)"
        elif group_ctx is not None and group_ctx.invoked_subcommand:  # click's parser gives some errors no ctx
            line += f" (see: {group_ctx.command_path} {group_ctx.invoked_subcommand} --help)"
        print_line(err_console, "error", line, "bold red")
        _FAILURE.update(error=f"error: {line}")
        raise typer.Exit(err.exit_code) from None


# typer's type checks speak pydantic; the user typed a command line
_TYPE_ERRORS = {
    "Input should be a valid integer, unable to parse string as an integer": "{} is not a whole number",
    "Input should be a valid number, unable to parse string as a number": "{} is not a number",
    "Value error, ": "",
}


def _refusal_text(err) -> str:
    """click's message for a refused command line, in the user's terms. An unknown option names the
    one option it is close to (`--stesp`: did you mean --steps?), not click's list of loose matches
    (`--bogus`: possible options --out)."""
    if isinstance(err, _NO_SUCH_OPTION):
        near = difflib.get_close_matches(err.option_name, err.possibilities or [], n=1, cutoff=0.75)
        return f"No such option: {err.option_name}" + (f". Did you mean {near[0]}?" if near else "")
    line = err.format_message()
    typed = _typed_value(err)
    for said, meant in _TYPE_ERRORS.items():
        line = line.replace(said, meant.format(typed))
    return line


def _typed_value(err) -> str:
    """What the user typed for the refused value, quoted, where typer's check kept it; else 'it'."""
    try:
        return repr(err.__cause__.errors()[0]["input"])
    except (AttributeError, IndexError, KeyError, TypeError):
        return "it"


app = typer.Typer(
    cls=_OneLineRefusals,
    name="promptbake",
    help="Bake a system prompt into a model's weights with on-policy context distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
GATE_FAILED = 4  # exit code when a quality threshold is missed
_FAILURE: dict = {}  # the last error line printed (by _run, or for a refused command line), for --json

_TYPES = {"str": str, "Path": Path, "int": int, "float": float, "bool": bool,
          "str | None": Optional[str], "Path | None": Optional[Path], "float | None": Optional[float]}


def _config_parameters(cls, required: tuple[str, ...] = ("model", "prompt")) -> list[inspect.Parameter]:
    """One typer option per config field: --flag-name, help from the field's metadata.

    Positional arguments (fields marked `argument`) come first, then the options in field order.
    """
    _REQUIRED = set(required)
    params = []
    for f in sorted(fields(cls), key=lambda f: not f.metadata.get("argument")):
        py_type = _TYPES[f.type]
        meta = f.metadata
        kwargs = {"help": meta["help"], "show_default": f.name not in _REQUIRED and f.default is not None}
        if meta.get("choices"):
            py_type = enum.Enum(f.name, {c: c for c in meta["choices"]}, type=str)  # typer lists the choices
        if py_type is bool:
            decls = [flag(f.name)] if not f.default else [f"{flag(f.name)}/--no-{f.name.replace('_', '-')}"]
        else:
            decls = [flag(f.name)]
        # Required options may come from --config, so typer asks for none; validate() names what is missing.
        default = None if f.name in _REQUIRED or f.default is MISSING else f.default
        if isinstance(py_type, type) and issubclass(py_type, enum.Enum):
            default = py_type(default)
        if meta.get("argument"):
            option = typer.Argument(help=meta["help"], show_default=False)
            py_type = Optional[py_type]
        else:
            option = typer.Option(*decls, **kwargs)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[py_type, option]))
    return params


def _run(fn, *args, **kwargs):
    """Call library code; turn its errors, Ctrl-C and SIGTERM into one line and an exit code."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:  # SIGTERM (CI cancel, pre-emption) unwinds like Ctrl-C, so temporary files go
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return fn(*args, **kwargs)
    except Interrupted as err:
        print_line(err_console, "interrupted", str(err), "bold red")
        _FAILURE.update(error=f"interrupted: {err}")
        raise typer.Exit(err.exit_code) from None
    except PromptbakeError as err:
        print_line(err_console, "error", str(err), "bold red")  # never as markup: paths may hold [brackets]
        _FAILURE.update(error=f"error: {err}")
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt as err:
        text = ("the output was not written; running the same command again continues from the last checkpoint, "
                "if one was saved.")
        err_console.print(f"[bold red]interrupted:[/] {text}", highlight=False)
        _FAILURE.update(error=f"interrupted: {text}")
        raise typer.Exit(143 if isinstance(err, Terminated) else 130) from None
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise Terminated()


def _options(options: dict) -> dict:
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in options.items()}


def _gates(gates: list[dict]) -> None:
    """Print each quality gate on stderr; exit with GATE_FAILED if any was missed."""
    for g in gates:
        mark = "[green]gate passed:[/]" if g["passed"] else "[bold red]gate failed:[/]"
        err_console.print(mark, escape(g["message"]), highlight=False, soft_wrap=True)
    if not all(g["passed"] for g in gates):
        raise typer.Exit(GATE_FAILED)


# ---------------------------------------------------------------- in CI: --config, --json, --force, plan
#
# Kept apart from the commands above: each command calls _ci_options / _from_config / _json_result.

_CI_HELP = {
    "config": "TOML file of settings (keys are option names; [distill], [eval], [chat] tables). Flags override it.",
    "json": "Print one JSON object with the results, gates, paths and exit code on stdout; all else goes to stderr.",
    "force": "Bake again even if --out already holds this same bake (and replace it).",
    "plan_force": "Plan as distill --force would: bake again even if --out is up to date.",
}


@dataclass
class _CI:
    ctx: typer.Context
    config: Path | None
    json: bool
    force: bool


def _ci_parameters(command: str) -> list[inspect.Parameter]:
    """--config for every command; --json for distill, eval and plan; --force for distill and plan."""
    def option(name: str, annotation, help_key: str | None = None):
        is_flag = annotation is bool
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False if is_flag else None,
                                 annotation=Annotated[bool if is_flag else Optional[annotation],
                                                      typer.Option(flag(name), help=_CI_HELP[help_key or name])])

    # typer passes the click context to a parameter typed typer.Context: it tells which flags were typed.
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
              option("config", Path)]
    if command in ("distill", "eval", "plan"):
        params.append(option("json", bool))
    if command in ("distill", "plan"):
        params.append(option("force", bool, "force" if command == "distill" else "plan_force"))
    return params


def _ci_options(options: dict, command: str) -> _CI:
    """Take the options _ci_parameters added out of `options` (what is left are the config's fields)."""
    force = options.pop("force", False) if command in ("distill", "plan") else False
    return _CI(options.pop("ctx"), options.pop("config", None), options.pop("json", False), force)


def _from_config(cls, command: str, options: dict, ci: _CI):
    """cls(...) from the flags, with --config's values for every option not given on the command line."""
    from .configfile import load_settings

    values = _options(options)
    if ci.config is not None:
        typed = {name for name in options if _source(ci.ctx, name) in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")}
        values.update({k: v for k, v in _run(load_settings, ci.config, command).items() if k not in typed})
    return cls(**values)


def _source(ctx: typer.Context, name: str) -> str | None:
    """Where click took an option's value from (COMMANDLINE, DEFAULT, ...)."""
    source = ctx.get_parameter_source(name)
    return source.name if source is not None else None


@contextlib.contextmanager
def _json_result(command: str, enabled: bool):
    """With --json: whatever happens, end with one JSON object on stdout holding the exit code (and error)."""
    result: dict = {}
    _FAILURE.clear()  # (a fresh answer for each command run in this process)
    code = 0
    try:
        yield result
    except typer.Exit as done:
        code = done.exit_code
        raise
    except Exception as err:  # a bug: still a JSON answer, then the traceback
        code, _FAILURE["error"] = 1, f"internal error: {type(err).__name__}: {err}"
        raise
    finally:
        if enabled:
            gates = result.get("gates") or []
            answer = {"command": command, "exit_code": code, "ok": code == 0, "error": _FAILURE.get("error"),
                      "gates_passed": all(g["passed"] for g in gates) if gates else None, **result}
            typer.echo(json.dumps(answer, indent=2, default=str))
            _FAILURE["answered"] = True


def distill_json(baked) -> dict:
    """distill --json: where everything is, the bake key and the figures of promptbake.json."""
    from .configfile import SETTINGS_FILE

    record, out = baked.record, Path(baked.out)
    return {
        "up_to_date": baked.up_to_date,
        "bake_key": (record.get("bake") or {}).get("key"),
        "out": str(out),
        "files": {"record": str(out / "promptbake.json"), "settings": str(out / SETTINGS_FILE),
                  "metrics": str(out / "metrics.jsonl"), "adapter": str(out / "adapter")},
        "results": record["results"],
        "gates": (record["results"].get("eval") or {}).get("gates", []),
    }


def eval_json(report, cfg: EvalConfig) -> dict:
    """eval --json: the report's figures (eval.json's content), its gates, files and the bake's key."""
    from .bakekey import recorded_bake

    record = recorded_bake(cfg.baked) or {}
    folder = Path(cfg.report) if cfg.report is not None else None
    return {
        "baked": str(cfg.baked),
        "bake_key": (record.get("bake") or {}).get("key"),
        "files": {"json": str(folder / "eval.json"), "markdown": str(folder / "eval.md")} if folder else {},
        "results": report.to_json(),
        "gates": [g.to_json() for g in report.gates],
    }


def plan_command(**options):
    """Check what distill checks before loading weights, and show what the bake will do and cost.

    Reads the tokenizer and the model's config, never its weights. Exit codes: 0 ok, 2 bad input
    (the same one-line errors distill gives).
    """
    from .plan import make_plan, print_plan

    ci = _ci_options(options, "plan")
    with _json_result("plan", ci.json) as result:
        cfg = _from_config(DistillConfig, "plan", options, ci)
        plan = _run(make_plan, cfg, err_console, force=ci.force)
        print_plan(plan, err_console if ci.json else Console())
        result.update(plan.to_json())




def distill_command(**options):
    """Bake --prompt into --model and write a merged checkpoint to --out.

    An --out that already holds this same bake (same bake key) is left as it is: exit 0 at once.
    Exit codes: 0 ok or up to date, 2 bad input, 3 training or writing failed, 4 a gate was missed.
    """
    from .bake import distill

    ci = _ci_options(options, "distill")
    with _json_result("distill", ci.json) as result:
        cfg = _from_config(DistillConfig, "distill", options, ci)
        baked = _run(distill, cfg, err_console, force=ci.force)
        result.update(distill_json(baked))
        _gates((baked.record["results"].get("eval") or {}).get("gates", []))


distill_command.__signature__ = inspect.Signature(_config_parameters(DistillConfig) + _ci_parameters("distill"))
app.command("distill", help=distill_command.__doc__)(distill_command)


def _field(name: str):
    """A DistillConfig field, so `prompts` shares distill's defaults and help text."""
    return next(f for f in fields(DistillConfig) if f.name == name)


def _same_as_distill(name: str):
    return typer.Option(flag(name), help=_field(name).metadata["help"])


@app.command("prompts")
def prompts_command(
    source: Annotated[Optional[str], typer.Argument(
        help="A bundled set, a file, a save_to_disk folder or a hub dataset id. Leave out to list what is bundled."
    )] = None,
    prompt_field: Annotated[str, _same_as_distill("prompt_field")] = _field("prompt_field").default,
    split: Annotated[str, _same_as_distill("split")] = _field("split").default,
    max_prompts: Annotated[int, _same_as_distill("max_prompts")] = _field("max_prompts").default,
    seed: Annotated[int, _same_as_distill("seed")] = _field("seed").default,
):
    """List the bundled prompt sets, or show what a prompt source yields before a bake."""
    out = Console()
    if source is None:
        _print_bundled(out, _run(data.bundled_sets), _run(data.example_system_prompts))
        return
    ps = _run(data.load_prompt_set, source, prompt_field=prompt_field, split=split, max_prompts=max_prompts,
              seed=seed)
    _print_prompt_set(out, ps)


def _print_bundled(out: Console, sets, systems) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Bundled prompt sets (--prompts NAME)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("prompts", justify="right")
    table.add_column("use")
    for s in sets:
        table.add_row(s.name, str(s.size), s.use)
    out.print(table)
    table = Table(title="Example system prompts (--prompt FILE)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("words", justify="right")
    table.add_column("checks", justify="right")
    table.add_column("file", overflow="fold")
    for p in systems:
        table.add_row(p.name, str(p.words), str(p.checks), Text(str(p.path)))
    out.print(table)


def _print_prompt_set(out: Console, ps, show: int = 5) -> None:
    from rich.table import Table
    from rich.text import Text

    out.print(ps.describe(), markup=False, highlight=False, soft_wrap=True)
    table = Table(title=f"first {min(show, len(ps))}, in the order --seed gives", title_justify="left")
    table.add_column("#", justify="right", min_width=len(str(show)))
    table.add_column("turns", justify="right", min_width=5)
    # One line per prompt, cut to what is left of the terminal after the other two columns.
    table.add_column("prompt", no_wrap=True, overflow="ellipsis", max_width=max(20, out.width - 20))
    for i, messages in enumerate(ps.prompts[:show], start=1):
        table.add_row(str(i), str(len(messages)), Text(_compact(messages)))  # Text: brackets aren't markup
    out.print(table)
    out.print("Prompts too long for the model's context are dropped when a bake starts, once its tokenizer "
              "is known; distill reports how many.", style="dim", highlight=False)


def _compact(messages) -> str:
    """A single user turn as it is; a conversation as one 'role: text' line per turn, the newest last."""
    if len(messages) == 1:
        return " ".join(messages[0]["content"].split())
    lines = [f"{m['role']}: {' '.join(m['content'].split())}" for m in messages]
    if len(lines) > 3:
        lines = [f"({len(lines) - 2} earlier turns)", *lines[-2:]]
    return "\n".join(lines)


def eval_command(**options):
    """Compare --baked, the prompted teacher and the base on held-out prompts; gate on the results.

    Exit codes: 0 ok, 2 bad input, 4 a --min-*/--max-* threshold was missed.
    """
    ci = _ci_options(options, "eval")
    with _json_result("eval", ci.json) as result:
        cfg = _from_config(EvalConfig, "eval", options, ci)
        report = _run(evaluate, cfg, err_console)
        print_report(report, err_console if ci.json else Console())  # with --json, stdout holds only the JSON
        result.update(eval_json(report, cfg))
        _gates([g.to_json() for g in report.gates])


eval_command.__signature__ = inspect.Signature(_config_parameters(EvalConfig, required=("baked", "model", "prompt"))
                                               + _ci_parameters("eval"))
app.command("eval", help=eval_command.__doc__)(eval_command)


def chat_command(**options):
    """Ask the baked model, the prompted teacher and the base the same message; show the answers side by side."""
    ci = _ci_options(options, "chat")
    cfg = _from_config(ChatConfig, "chat", options, ci)
    _run(cfg.validate)
    interactive = cfg.message is None and sys.stdin.isatty()
    message = None if interactive else _run(_one_message, cfg.message)
    models = _run(_load_for_chat, cfg)
    out = Console()
    while True:
        if interactive:
            try:
                message = input("you> ")
            except (EOFError, KeyboardInterrupt):
                break
            if not message.strip():
                continue
        print_answers(_run(answer, models, message.strip(), cfg.seed), out)
        if not interactive:
            break


chat_command.__signature__ = inspect.Signature(_config_parameters(ChatConfig, required=("baked", "model", "prompt"))
                                               + _ci_parameters("chat"))
app.command("chat", help=chat_command.__doc__)(chat_command)


def _load_for_chat(cfg: ChatConfig):
    return load_compared(cfg.baked, cfg.model, read_system_prompt(cfg.prompt), max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, chat_template=cfg.chat_template,
                         trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, force=cfg.force,
                         sampler=cfg.sampler, console=err_console, what="baked folder")


def _one_message(message: str | None) -> str:
    """--message, or all of stdin when it isn't a terminal; never empty."""
    text = sys.stdin.read() if message is None else message
    if not text.strip():
        raise InputError("the message is empty: pass --message TEXT or pipe the text on stdin.")
    return text.strip()


plan_command.__signature__ = inspect.Signature(_config_parameters(DistillConfig) + _ci_parameters("plan"))
app.command("plan", help=plan_command.__doc__)(plan_command)


@app.command("export")
def export_command(
    baked: Annotated[Path, typer.Argument(help="The baked checkpoint folder (the --out of promptbake distill).")],
    format: Annotated[str, typer.Option("--format", help="Output format; gguf is the one there is.")] = "gguf",
    outtype: Annotated[str, typer.Option(
        "--outtype", help="Weight type in the file: f32, f16, bf16 or q8_0 (norms and biases stay f32).")] = "f16",
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="The .gguf file to write. Default: BAKED/model-OUTTYPE.gguf.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the file if it exists.")] = False,
):
    """Write the bake as one GGUF file for llama.cpp / Ollama / LM Studio, with an Ollama Modelfile beside it."""
    from .export import export_gguf

    _run(export_gguf, baked, out, outtype=outtype, overwrite=overwrite, console=err_console, format=format)


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
):
    pass


def entry() -> None:
    try:
        code = app()
    except SystemExit as done:
        _json_usage_error(done.code)
        raise
    sys.exit(code)


def _json_usage_error(code) -> None:
    """--json and the command line itself was wrong (click refused it before the command ran): still answer."""
    argv = sys.argv[1:]
    if "--json" in argv and code not in (0, None) and not _FAILURE.get("answered"):
        command = next((a for a in argv if not a.startswith("-")), None)
        error = _FAILURE.get("error", "error: the command line was refused (the reason is on stderr)")
        typer.echo(json.dumps({"command": command, "exit_code": code, "ok": False, "gates_passed": None,
                               "error": error}, indent=2))


if __name__ == "__main__":  # python -m promptbake.cli
    entry()
