"""The Ollama Modelfile written beside an exported GGUF.

Its TEMPLATE is the chat template said again in Go's text/template syntax, which
is what Ollama reads. Translating arbitrary Jinja is out of reach, so the template
is *measured* instead: render a few probe conversations with the Jinja template,
cut out what each role adds around its content (and what comes before the first
message, e.g. a default system line, and after the last, the generation prompt),
and emit a Go template that puts those same strings around each message. The
result is then checked by rendering conversations through both and comparing the
text; `render_go` below is a renderer of exactly the Go-template subset emitted
here. When the two disagree the Modelfile is written without a TEMPLATE (Ollama
then reads the chat template stored in the GGUF itself) and the caller says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# Placeholders unlikely to appear in any template's own text.
_S, _U1, _U2, _A1 = "PBSYSTEMXQ", "PBUSERONEXQ", "PBUSERTWOXQ", "PBASSISTANTXQ"


class TemplateTranslationError(Exception):
    """The chat template doesn't have the shape the Go template can express."""


@dataclass
class ChatShape:
    """The strings a chat template puts around each message, measured by rendering probes."""

    preamble: str  # before the first message when it isn't a system message (BOS, a default system line)
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # the generation prompt after the last message
    system: tuple[str, str] | None  # its own block (it includes anything before it, e.g. BOS); None: see below
    system_joiner: str | None  # no own block: the system text goes first in the first user turn, then this


def measure(render) -> ChatShape:
    """`render(messages, add_generation_prompt) -> str` is the Jinja chat template."""
    def msg(role, content):
        return {"role": role, "content": content}

    def cut(text: str, prefix: str, what: str) -> str:
        if not text.startswith(prefix):
            raise TemplateTranslationError(f"adding {what} changes what comes before it")
        return text[len(prefix):]

    def split(segment: str, marker: str, what: str) -> tuple[str, str]:
        if segment.count(marker) != 1:
            raise TemplateTranslationError(f"the {what} message's text isn't rendered once, unchanged")
        before, after = segment.split(marker)
        return before, after

    u1 = render([msg("user", _U1)], False)
    ua = render([msg("user", _U1), msg("assistant", _A1)], False)
    uau = render([msg("user", _U1), msg("assistant", _A1), msg("user", _U2)], False)
    gen = render([msg("user", _U1)], True)
    assistant = split(cut(ua, u1, "an assistant message"), _A1, "assistant")
    user = split(cut(uau, ua, "a second user message"), _U2, "user")
    generation = cut(gen, u1, "the generation prompt")
    first = user[0] + _U1 + user[1]
    if not u1.endswith(first):
        raise TemplateTranslationError("the first user message is rendered unlike later ones")
    preamble = u1[: len(u1) - len(first)]

    try:
        s = render([msg("system", _S), msg("user", _U1)], False)
    except Exception:  # a template without a system role raises (Gemma's does)
        return ChatShape(preamble, user, assistant, generation, None, None)
    head = s[: len(s) - len(first)]
    if s.endswith(first) and head.count(_S) == 1:
        return ChatShape(preamble, user, assistant, generation, split(head, _S, "system"), None)
    merged = re.fullmatch(re.escape(preamble + user[0] + _S) + "(.*)" + re.escape(_U1 + user[1]), s, re.S)
    if merged:
        return ChatShape(preamble, user, assistant, generation, None, merged.group(1))
    raise TemplateTranslationError("the system message is rendered in a way the Go template can't express")


def _lit(text: str) -> str:
    """`text` as a Go template action printing it: a JSON string is a valid Go string literal."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(shape: ChatShape) -> str:
    """The Go template (Ollama's `.Messages` with `.Role` and `.Content`) that renders like `shape`."""
    lines = ["{{- range $i, $_ := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}"]
    if shape.preamble:
        when = "and (eq $i 0) (ne .Role \"system\")" if shape.system else "eq $i 0"
        lines.append("{{- if " + when + " }}" + _lit(shape.preamble) + "{{ end }}")
    if shape.system:
        lines.append('{{- if eq .Role "system" }}' + _lit(shape.system[0]) + "{{ .Content }}" + _lit(shape.system[1]))
    else:  # no block of its own: either dropped, or put first in the first user turn
        lines.append('{{- if eq .Role "system" }}')
    first_user = ""
    if shape.system_joiner is not None:
        first_user = ('{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}'
                      "{{ (index $.Messages 0).Content }}" + _lit(shape.system_joiner) + "{{ end }}")
    lines.append('{{- else if eq .Role "user" }}' + _lit(shape.user[0]) + first_user + "{{ .Content }}"
                 + _lit(shape.user[1]))
    lines.append('{{- else if eq .Role "assistant" }}' + _lit(shape.assistant[0]) + "{{ .Content }}"
                 + _lit(shape.assistant[1]))
    lines.append("{{- end }}")
    if shape.generation:
        lines.append('{{- if and $last (ne .Role "assistant") }}' + _lit(shape.generation) + "{{ end }}")
    lines.append("{{- end }}")
    return "\n".join(lines)


# Conversations both renderings must agree on: with and without a system message, several turns.
CHECKS = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Tell me a joke.\nA short one."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One"},
     {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"}],
]


def translate(render) -> str:
    """The Go template for the Jinja template `render`, checked on CHECKS; raises TemplateTranslationError."""
    shape = measure(render)
    template = go_template(shape)
    for messages in CHECKS:
        if shape.system is None and shape.system_joiner is None and messages[0]["role"] == "system":
            continue  # the Jinja template refuses these
        want, got = render(messages, True), render_go(template, messages)
        if want != got:
            raise TemplateTranslationError(f"the Go template renders {got!r} where the chat template gives {want!r}")
    return template


def modelfile_text(gguf_name: str, template: str | None, stops: list[str]) -> str:
    """FROM, TEMPLATE and PARAMETER stop lines; no SYSTEM line: the system prompt is in the weights."""
    lines = ["# Written by promptbake export. The system prompt is baked into the weights: no SYSTEM line.",
             f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"


# --- A renderer of the Go text/template subset above --------------------------------------------

_ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|-?\d+|\$?[A-Za-z_]*(?:\.[A-Za-z_]+)*|\$)')


def render_go(template: str, messages: list[dict]) -> str:
    """Render `template` with Ollama's data `{"Messages": [{"Role", "Content"}, ...]}`.

    Supports text with `{{- ` / ` -}}` trimming, `range $i, $_ := X`, `if` / `else if` / `else` / `end`,
    `$x := X`, string and integer literals, fields (`.Role`, `$.Messages`, `(expr).Role`) and the
    functions eq, ne, and, or, not, len, slice, index. Anything else raises ValueError.
    """
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    body, rest = _parse(_lex(template), 0, ())
    if rest != len(_lex(template)):
        raise ValueError("unexpected {{ end }} or {{ else }}")
    out: list[str] = []
    _exec(body, {"$": data}, data, out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)], with the trim markers applied to the neighbouring text."""
    items, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            while pos < len(template) and template[pos] in " \t\r\n":
                pos += 1
    items.append(("text", template[pos:]))
    return [i for i in items if i != ("text", "")]


def _parse(items, i, stop):
    """Nodes from items[i] up to an action in `stop`; returns (nodes, index of that action)."""
    nodes = []
    while i < len(items):
        kind, s = items[i]
        if kind == "text":
            nodes.append(("text", s))
            i += 1
            continue
        word = s.split(" ", 1)[0]
        if word in stop or (s.startswith("else") and "else" in stop):
            return nodes, i
        if word == "range":
            m = re.fullmatch(r"range (\$\w+), (\$\w+) := (.+)", s)
            if not m:
                raise ValueError(f"unsupported range: {s}")
            body, i = _parse(items, i + 1, ("end",))
            nodes.append(("range", m.group(1), m.group(2), m.group(3), body))
            i += 1
        elif word == "if":
            branches, cond = [], s[3:]
            while True:
                body, i = _parse(items, i + 1, ("end", "else"))
                branches.append((cond, body))
                action = items[i][1]
                if action == "end":
                    break
                cond = action[8:] if action.startswith("else if ") else "true"
            nodes.append(("if", branches))
            i += 1
        elif re.match(r"\$\w+ :?= ", s):
            name, expr = re.split(r" :?= ", s, maxsplit=1)
            nodes.append(("set", name, expr))
            i += 1
        else:
            nodes.append(("print", s))
            i += 1
    return nodes, i


def _exec(nodes, env, dot, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            value = _eval(node[1], env, dot)
            out.append(value if isinstance(value, str) else str(value))
        elif node[0] == "set":
            env[node[1]] = _eval(node[2], env, dot)
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond == "true" or _truthy(_eval(cond, env, dot)):
                    _exec(body, env, dot, out)
                    break
        elif node[0] == "range":
            _, index_var, value_var, expr, body = node
            for n, item in enumerate(_eval(expr, env, dot)):
                _exec(body, {**env, index_var: n, value_var: item}, item, out)


def _truthy(v) -> bool:
    return bool(v)  # Go: false, 0, "", empty list and nil are false, like Python's


def _eval(expr: str, env, dot):
    tokens = [t for t in _TOKEN.findall(expr) if t]
    value, rest = _command(tokens, 0, env, dot)
    if rest != len(tokens):
        raise ValueError(f"can't parse {expr!r}")
    return value


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truthy(a),
    "len": len,
    "slice": lambda x, i, j=None: x[i:j],
    "index": lambda x, i: x[i],
}


def _command(tokens, i, env, dot):
    """A function call `f arg...` or a single operand, up to a closing parenthesis."""
    if i < len(tokens) and tokens[i] in (*_FUNCS, "and", "or"):
        name, args, i = tokens[i], [], i + 1
        while i < len(tokens) and tokens[i] != ")":
            arg, i = _operand(tokens, i, env, dot)
            args.append(arg)
        if name == "and":
            return next((a for a in args if not _truthy(a)), args[-1]), i
        if name == "or":
            return next((a for a in args if _truthy(a)), args[-1]), i
        return _FUNCS[name](*args), i
    return _operand(tokens, i, env, dot)


def _operand(tokens, i, env, dot):
    t = tokens[i]
    if t == "(":
        value, i = _command(tokens, i + 1, env, dot)
        if tokens[i] != ")":
            raise ValueError("missing )")
        i += 1
        while i < len(tokens) and tokens[i].startswith("."):  # (expr).Field
            value = _fields(value, tokens[i])
            i += 1
        return value, i
    if t.startswith('"'):
        return json.loads(t), i + 1
    if re.fullmatch(r"-?\d+", t):
        return int(t), i + 1
    if t.startswith("$"):
        name, _, path = t.partition(".")
        return _fields(env[name], "." + path if path else ""), i + 1
    if t.startswith("."):
        return _fields(dot, t), i + 1
    raise ValueError(f"unsupported token {t!r}")


def _fields(value, path: str):
    for name in filter(None, path.split(".")):
        value = value[name]
    return value
