"""Errors promptbake raises for things the user can fix.

Every message is written for the person at the terminal: what is wrong and what
to do next. The CLI prints them on one line and exits non-zero; a Python caller
can catch `PromptbakeError` (or a subclass) and show `str(err)`.
"""

import re


class PromptbakeError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class InputError(PromptbakeError):
    """A file, option or value given by the user can't be used."""


class ModelLoadError(PromptbakeError):
    """A model or tokenizer can't be found, reached or loaded."""


class TemplateError(PromptbakeError):
    """The chat template can't render what a bake needs."""


class TokenizerMismatchError(PromptbakeError):
    """Teacher and student tokenizers disagree, so their logits can't be compared."""


class ContextTooLongError(PromptbakeError):
    """The system prompt (plus a response) doesn't fit the model's context."""


class OutputExistsError(PromptbakeError):
    """The output folder exists and --overwrite was not given."""


class OutputLockedError(PromptbakeError):
    """Another bake that is still running holds the lock on this output (see lock.py)."""


class TrainingError(PromptbakeError):
    """Training stopped: the loss became NaN/inf or memory ran out."""

    exit_code = 3


class WriteError(PromptbakeError):
    """A checkpoint or the output couldn't be written (disk full, permissions); the run can be resumed."""

    exit_code = 3


class Interrupted(PromptbakeError):
    """Ctrl-C or SIGTERM stopped the bake after a checkpoint was saved; exit 130 or 143 like the shell."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception, so that cleanup runs for it as it does for Ctrl-C."""


def describe(err: BaseException) -> str:
    """A short reason for a message: an OSError's own text ("No space left on device"), else the first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    wrapped = re.search(r"I/O error: (.+?) \(os error \d+\)", str(err))  # safetensors' wrapping of an OSError
    if wrapped:
        return wrapped.group(1)
    return first_line(err)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def is_out_of_memory(err: BaseException) -> bool:
    """True for host or GPU out-of-memory errors (torch.OutOfMemoryError is a RuntimeError)."""
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def print_line(console, label: str, message: str, style: str = "yellow") -> None:
    """Print `label: message` on one logical line, the label styled, the message exactly as it is.

    Messages hold paths and user text: printed as markup, "[bold]" in a folder name would vanish
    and "holds no [] tables" lose its brackets, so the message never goes through rich's markup.
    """
    from rich.text import Text

    console.print(Text.assemble((f"{label}:", style), " ", message), highlight=False, soft_wrap=True)


def note(console, message: str) -> None:
    """A `note:` line: something done or noticed that the user should hear of, not an error."""
    print_line(console, "note", message)
