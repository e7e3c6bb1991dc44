"""Chat templates: a model's Jinja chat template rendered with `jinja2` as transformers'
`apply_chat_template` renders it (details: docs/guides/cli.md), and a conversation cut into the
pieces training needs: the text between assistant turns (not trained) and each assistant turn,
end-of-turn marker included (trained).

>>> template = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>"
...                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
>>> template.pieces([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
[('<user>Hi</s><assistant>', False), ('Yo</s>', True)]
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_jax.core.jsonfile import read_json

Message = Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special-token strings it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    where: str = "the chat template"  # named in errors

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as the template writes it (transformers' `apply_chat_template(...,
        tokenize=False)`)."""
        import jinja2

        try:
            return _compiled(self.source).render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, tools=None, documents=None)
        except jinja2.TemplateError as err:
            raise ValueError(f"{self.where} failed to render: {err}") from None

    def pieces(self, messages: Sequence[Message]) -> list[tuple[str, bool]]:
        """(text, trained) pieces whose concatenation is `render(messages)`: each assistant
        message is the text its turn adds to the prompt that asks for it
        (`render(before, add_generation_prompt=True)`), trained; the text in between is not.
        A template that rewrites earlier turns when a later one is added (the prompt is not a
        prefix of the longer conversation) cannot be cut so: a ValueError."""
        out: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._extends(done, self.render(messages[:i], add_generation_prompt=True), i)
            turn = self._extends(prompt, self.render(messages[: i + 1]), i)
            out += [(prompt[len(done):], False), (turn[len(prompt):], True)]
            done = turn
        rest = self._extends(done, self.render(messages), len(messages))
        out.append((rest[len(done):], False))
        return [(text, trained) for text, trained in out if text]

    def _extends(self, prefix: str, text: str, index: int) -> str:
        if not text.startswith(prefix):
            raise ValueError(f"{self.where} rewrites the text of earlier turns when message "
                             f"{index} is added, so its assistant turns cannot be told apart "
                             "for the loss: use a template that only appends")
        return text


@functools.lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (TRL's assistant-mask tags): the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # transformers' filter: these options only
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda f: datetime.datetime.now().strftime(f))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"the chat template is not valid Jinja (line {err.lineno}: "
                         f"{err.message})") from None


def _token_text(value: Any) -> str:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def read_chat_template(folder: str | Path) -> ChatTemplate | None:
    """The chat template of an HF model folder (chat_template.jinja, else tokenizer_config.json's
    `chat_template`: a string, or a list of named templates of which "default" is taken), with
    the config's `bos_token` / `eos_token`; None when the folder has none."""
    folder = Path(folder)
    config_file = folder / "tokenizer_config.json"
    loaded = read_json(config_file) if config_file.is_file() else {}
    config: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
    source: Any = config.get("chat_template")
    where = f"the chat template of {config_file}"
    if (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        where = f"the chat template {folder / 'chat_template.jinja'}"
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        source = named.get("default")
    if not isinstance(source, str):
        return None
    return ChatTemplate(source, _token_text(config.get("bos_token")),
                        _token_text(config.get("eos_token")), where)
