"""The `promptbake` command: a thin layer over the library.

Options are generated from `DistillConfig`'s fields, so the help text lives in
one place. Library errors (`PromptbakeError`) become one red line and a non-zero
exit. Heavy modules (torch, transformers, peft) are imported inside commands.
"""

from __future__ import annotations

import enum
import inspect
import signal
import sys
import threading
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .config import DistillConfig, flag
from .errors import Interrupted, PromptbakeError, Terminated

app = typer.Typer(
    name="promptbake",
    help="Bake a system prompt into a model's weights with on-policy context distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

_REQUIRED = {"model", "prompt"}
_TYPES = {"str": str, "Path": Path, "int": int, "float": float, "bool": bool,
          "str | None": Optional[str], "Path | None": Optional[Path]}


def _config_parameters(cls) -> list[inspect.Parameter]:
    """One typer option per config field: --flag-name, help from the field's metadata."""
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
    """Call library code; turn its errors, Ctrl-C and SIGTERM into one line and an exit code."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:  # SIGTERM (CI cancel, pre-emption) unwinds like Ctrl-C, so temporary files go
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return fn(*args, **kwargs)
    except Interrupted as err:
        err_console.print(f"[bold red]interrupted:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code) from None
    except PromptbakeError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt as err:
        err_console.print("[bold red]interrupted:[/] the output was not written; running the same command again "
                          "continues from the last checkpoint, if one was saved.", highlight=False)
        raise typer.Exit(143 if isinstance(err, Terminated) else 130) from None
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise Terminated()


def distill_command(**options):
    """Bake --prompt into --model and write a merged checkpoint to --out."""
    from .bake import distill

    cfg = DistillConfig(**{k: v.value if isinstance(v, enum.Enum) else v for k, v in options.items()})
    _run(distill, cfg, err_console)


distill_command.__signature__ = inspect.Signature(_config_parameters(DistillConfig))
app.command("distill", help=distill_command.__doc__)(distill_command)


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


if __name__ == "__main__":  # python -m promptbake.cli
    entry()
