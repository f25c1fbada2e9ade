"""The teacher sees the system prompt; the student doesn't — checked on token ids."""

import pytest

from promptbake.errors import TemplateError
from promptbake.models import load_tokenizer, resolve_model
from promptbake.render import Renderer

SYSTEM = "Speak like a pirate."
MSG = [{"role": "user", "content": "Why is the sky blue?"}]


def _tok(folder):
    return load_tokenizer(resolve_model(str(folder)))


def test_student_has_no_system_prompt_teacher_has_it(tiny_dir):
    tok = _tok(tiny_dir)
    r = Renderer(tok, SYSTEM)
    assert r.system_role
    student, teacher = r.student_ids(MSG), r.teacher_ids(MSG)
    expected_student = tok("<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
                           add_special_tokens=False)["input_ids"]
    expected_teacher = tok(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhy is the sky blue?"
                           "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert student == expected_student
    assert teacher == expected_teacher
    assert SYSTEM not in tok.decode(student)
    # The teacher's input ends with exactly the student's input: same conversation, system turn in front.
    assert teacher[-len(student):] == student


def test_system_prefix_is_a_prefix_of_every_teacher_input(tiny_dir):
    r = Renderer(_tok(tiny_dir), SYSTEM)
    prefix = r.system_prefix()
    assert len(prefix) > 5
    for text in ["A", "hello", "Zebra crossing?", "7 z"]:
        assert r.teacher_ids([{"role": "user", "content": text}])[: len(prefix)] == prefix


def test_template_without_system_role_folds_prompt_into_first_user_turn(tiny_nosystem_dir):
    tok = _tok(tiny_nosystem_dir)
    r = Renderer(tok, SYSTEM)
    assert not r.system_role
    expected = tok(f"<|im_start|>user\n{SYSTEM}\n\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
                   add_special_tokens=False)["input_ids"]
    assert r.teacher_ids(MSG) == expected
    assert SYSTEM not in tok.decode(r.student_ids(MSG))


def test_multi_turn_conversation(tiny_dir):
    tok = _tok(tiny_dir)
    r = Renderer(tok, SYSTEM)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me more."}]
    assert tok.decode(r.teacher_ids(conv)).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")
    assert tok.decode(r.student_ids(conv)).count("<|im_start|>") == 4  # 3 turns + generation prompt


def test_no_chat_template_is_a_clear_error(tmp_path):
    import tiny

    folder = tiny.save_tiny(tmp_path / "m", template=None)
    with pytest.raises(TemplateError, match="has no chat template; pass --chat-template FILE"):
        Renderer(_tok(folder), SYSTEM, str(folder))
    # Given a template file, it renders.
    tok = load_tokenizer(resolve_model(str(folder)), chat_template=tiny.CHATML)
    assert Renderer(tok, SYSTEM).system_role
