"""Errors promptbake raises for things the user can fix.

Every message is written for the person at the terminal: what is wrong and what
to do next. The CLI prints them on one line and exits non-zero; a Python caller
can catch `PromptbakeError` (or a subclass) and show `str(err)`.
"""


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


class TrainingError(PromptbakeError):
    """Training stopped: the loss became NaN/inf or memory ran out."""

    exit_code = 3
