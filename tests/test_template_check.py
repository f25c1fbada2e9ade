"""A chat template that keeps the system prompt out of the teacher's input is refused before training."""

from __future__ import annotations

import pytest

from promptbake.errors import TemplateError
from promptbake.render import Renderer, check_teacher_sees_prompt
from tiny import CHATML, NO_SYSTEM, build_tokenizer

PROMPT = "You are a pirate.\n\nAlways   say arr."
IGNORES_MESSAGES = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
ROLES_ONLY = "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
DROPS_SYSTEM = ("{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endif %}{% endfor %}<|im_start|>assistant\n")
UPPER_CASE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
              "<|im_start|>assistant\n")
CUTS_CONTENT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'][:8] }}<|im_end|>\n{% endfor %}"
                "<|im_start|>assistant\n")
TRIMS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
         "<|im_start|>assistant\n")


def renderer(template: str) -> Renderer:
    return Renderer(build_tokenizer(template), PROMPT)


@pytest.mark.parametrize("template", [IGNORES_MESSAGES, ROLES_ONLY])
def test_a_template_rendering_the_same_tokens_with_and_without_the_prompt_is_refused(template):
    with pytest.raises(TemplateError) as err:
        check_teacher_sees_prompt(renderer(template), "--chat-template t.jinja")
    assert str(err.value) == (
        "--chat-template t.jinja renders a conversation to the same tokens with and without the system prompt, so "
        "the teacher would never see it and there would be nothing to bake; use a template that renders system "
        "messages (or the user's text, where the prompt goes when there is no system role).")


@pytest.mark.parametrize("template", [UPPER_CASE, CUTS_CONTENT])
def test_a_template_that_drops_or_rewrites_the_prompt_text_is_refused(template):
    with pytest.raises(TemplateError, match="doesn't put the system prompt's text into the teacher's input"):
        check_teacher_sees_prompt(renderer(template))


@pytest.mark.parametrize("template", [CHATML, NO_SYSTEM, DROPS_SYSTEM, TRIMS])
def test_templates_that_render_the_prompt_pass(template):
    # NO_SYSTEM and DROPS_SYSTEM have no system role: the prompt goes into the first user turn.
    check_teacher_sees_prompt(renderer(template))
