"""Student and teacher inputs: the same conversation, rendered with and without the system prompt.

The student sees exactly what a deployed baked model will see: the chat template
applied to the user's messages with no system message (whatever default the
template inserts then is part of that input). The teacher sees the system prompt
as a real system message, or folded into the first user turn for templates that
have no system role.
"""

from __future__ import annotations

from .data import Messages
from .errors import TemplateError

_PROBE = "\u2063promptbake-probe\u2063"


class Renderer:
    """Renders conversations to token ids for the student (no system prompt) and the teacher (with it)."""

    def __init__(self, tokenizer, system_prompt: str, model_name: str = "the model"):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"the tokenizer of {model_name} has no chat template; pass --chat-template FILE with a Jinja template."
            )
        self.tok = tokenizer
        self.system = system_prompt
        self.system_role = self._template_has_system_role()

    def _template_has_system_role(self) -> bool:
        try:
            text = self._render([{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}])
        except TemplateError:
            return False
        return _PROBE in text

    def _render(self, messages: Messages) -> str:
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # jinja2 raises TemplateError/Exception subclasses of its own
            raise TemplateError(f"the chat template failed to render a conversation: {err}") from None

    def _ids(self, text: str) -> list[int]:
        # The template already holds any BOS it wants; don't let the tokenizer add a second one.
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def student_ids(self, messages: Messages) -> list[int]:
        return self._ids(self._render(messages))

    def teacher_messages(self, messages: Messages) -> Messages:
        if self.system_role:
            return [{"role": "system", "content": self.system}, *messages]
        first, *rest = messages
        return [{"role": first["role"], "content": f"{self.system}\n\n{first['content']}"}, *rest]

    def teacher_ids(self, messages: Messages) -> list[int]:
        return self._ids(self._render(self.teacher_messages(messages)))

    def system_prefix(self) -> list[int]:
        """Leading teacher token ids that don't depend on the user's messages (may be empty).

        The longest common prefix of two renders with different user text. Callers must
        still check each real input starts with it: tokenizers can merge across the boundary.
        """
        a = self.teacher_ids([{"role": "user", "content": "A"}])
        b = self.teacher_ids([{"role": "user", "content": "7 z"}])
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return a[:n]


def check_teacher_sees_prompt(renderer: Renderer, template: str = "the chat template") -> None:
    """Refuse a chat template that leaves the system prompt out of the teacher's input.

    Such a template (one that ignores the messages, or drops or rewrites the system turn) bakes
    "successfully" with a KL of 0: the teacher never saw the prompt. Two checks on a probe
    conversation: the teacher's token ids must differ from the student's, and the rendered teacher
    text must hold the system prompt's text (compared with whitespace collapsed, since templates trim).
    template: how to name it in the message, e.g. "--chat-template chat.jinja" or "the chat template of MODEL".
    """
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    if renderer.teacher_ids(messages) == renderer.student_ids(messages):
        raise TemplateError(
            f"{template} renders a conversation to the same tokens with and without the system prompt, so the "
            "teacher would never see it and there would be nothing to bake; use a template that renders system "
            "messages (or the user's text, where the prompt goes when there is no system role)."
        )
    text = renderer._render(renderer.teacher_messages(messages))
    if renderer.system not in text and " ".join(renderer.system.split()) not in " ".join(text.split()):
        raise TemplateError(
            f"{template} doesn't put the system prompt's text into the teacher's input (it drops or rewrites it), "
            "so the bake would not teach that prompt; use a template that renders the messages' content as it is."
        )


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id a chat server stops a response at: the tokenizer's EOS, the generation config's EOS
    (an int or a list), and the end-of-turn token the chat template writes after an assistant message.

    The end of turn is read from the template itself, not from a table of model names: render a
    conversation whose assistant message is a probe, and take the first special token the template
    writes after it (Gemma's `<end_of_turn>`, Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`; a template
    that ends a turn with EOS adds nothing new). Templates that write no special token there, or
    can't render an assistant message, add nothing. Returns the ids in that order, without repeats.
    """
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    end = end_of_turn_id(tokenizer)
    if end is not None and end not in ids:
        ids.append(end)
    return ids


def end_of_turn_id(tokenizer) -> int | None:
    """The first special token the chat template writes after an assistant message's text, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that can't render an assistant turn (jinja raises its own types)
        return None
    if _PROBE not in text:
        return None
    after = text[text.rindex(_PROBE) + len(_PROBE):]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
    }
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return token_id
        if tokenizer.decode([token_id]).strip():
            return None  # ordinary text comes first (e.g. "\n### User:"): the turn ends with no token of its own
    return None
