"""Sphinx pieces of lora_jax's docs that no package provides.

- Executed Linen / NNX code side by side: consecutive notebook cells tagged `linen` and `nnx`
  become one sphinx-design tab set (myst-nb executes cells only at the top level of a page,
  so they cannot be written inside a `tab-set` directive).
- `lora-jax-api`: the API reference of every public name of a module (its `__all__`, or the
  functions and classes it defines), so a new public name is documented without editing a page.
- `lora-jax-cli`: the command line's reference read from the argparse parser itself
  (`lora_jax.cli.main.build_parser`), so it cannot drift from the code.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.transforms import SphinxTransform
from sphinx.util.docutils import SphinxDirective
from sphinx_design.shared import create_component

TABS = {"linen": "Linen", "nnx": "NNX"}


def _tab(cell: nodes.Element) -> str | None:
    if cell.get("nb_element") != "cell_code":
        return None
    return next((t for t in TABS if f"tag_{t}" in cell["classes"]), None)


class TabbedCells(SphinxTransform):
    """Runs of sibling cells tagged `linen` / `nnx` -> a tab set (Linen, NNX), synced page-wide."""

    default_priority = 500

    def apply(self, **kwargs: Any) -> None:
        for parent in list(self.document.findall(nodes.Element)):
            children, i = list(parent.children), 0
            while i < len(children):
                if not isinstance(children[i], nodes.Element) or _tab(children[i]) is None:
                    i += 1
                    continue
                j = i
                while j < len(children) and isinstance(children[j], nodes.Element) \
                        and _tab(children[j]) is not None:
                    j += 1
                tab_set = create_component("tab-set", classes=["sd-tab-set"])
                for name, label in TABS.items():
                    cells = [c for c in children[i:j] if _tab(c) == name]
                    if not cells:
                        continue
                    item = create_component("tab-item", classes=["sd-tab-item"],
                                            selected=not tab_set.children)
                    item += nodes.rubric(label, label, classes=["sd-tab-label"], sync_id=name,
                                         sync_group="frontend")
                    item += create_component("tab-content", classes=["sd-tab-content"],
                                             children=cells)
                    tab_set += item
                for cell in children[i:j]:
                    parent.remove(cell)
                parent.insert(parent.index(children[j]) if j < len(children) else len(parent),
                              tab_set)
                i = j


def _public(module: Any) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and (inspect.isfunction(v) or inspect.isclass(v))
                 and v.__module__ == module.__name__]
    return list(names)


class PublicApi(SphinxDirective):
    """`lora-jax-api MODULE`: autodoc entries for every public name of MODULE."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        modname = self.arguments[0]
        module = importlib.import_module(modname)
        lines, rst = [], []  # MyST markdown (the pages are .md) around autodoc's RST
        for name in _public(module):
            value = getattr(module, name)
            if inspect.ismodule(value):
                lines += [f"`{modname}.{name}` is the module `{value.__name__}`: see "
                          f"{{doc}}`/api/{value.__name__}`.", ""]
                continue
            if not (inspect.isclass(value) or callable(value)):  # a constant: its value
                shown = repr(sorted(value) if isinstance(value, dict) else value)
                rst += [f".. py:data:: {modname}.{name}", "", f"   ``{shown}``", ""]
                continue
            kind = "autoclass" if inspect.isclass(value) else "autofunction"
            rst += [f".. {kind}:: {modname}.{name}"]
            if kind == "autoclass":
                rst.append("   :members:")
            rst.append("")
        lines += ["```{eval-rst}", *rst, "```", ""]
        content = StringList(lines, source=f"<lora-jax-api {modname}>")
        holder = nodes.container()
        self.state.nested_parse(content, self.content_offset, holder)
        return holder.children


_TICKS = re.compile(r"`[^`]+`(?=([\w(]?))")


def readable_rst(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                 lines: list[str]) -> None:
    """The docstrings are written as the README is (backticked code, `- ` lists, indented
    examples); read them as RST says: a list after a paragraph gets its blank line, an
    indented example is a literal block, and a backticked name followed by letters
    (`vmap`ped) ends its code before them. Display only: the docstrings are unchanged."""
    out: list[str] = []
    literal = 0  # the indent of the literal block being copied, 0 when none
    for line in lines:
        text = line.lstrip()
        indent = len(line) - len(text)
        last = out[-1] if out else ""
        if literal:
            if not text or indent >= literal:
                out.append(line)
                continue
            literal = 0
            if out[-1]:
                out.append("")
        is_list = text.startswith("- ")
        in_list = last.startswith("- ") or (last.startswith("  ") and not last.startswith("    "))
        if text and indent >= 4 and not last.startswith(("- ", " ", ">>>", "...")) \
                and not last.rstrip().endswith("::"):
            out += [""] * bool(last) + ["::", ""]
            literal = indent
            out.append(line)
            continue
        if text and indent == 0 and last and ((is_list and not in_list) or
                                              (not is_list and in_list)):
            out.append("")
        out.append(line)
    text = _TICKS.sub(lambda m: m[0] + "\\ " * bool(m[1]), "\n".join(out))
    lines[:] = text.split("\n")


def _option(action: argparse.Action) -> nodes.Node:
    flags = ", ".join(action.option_strings) or action.dest
    if action.nargs != 0 and action.option_strings:
        flags += " " + (action.metavar or (("{" + ",".join(map(str, action.choices)) + "}")
                                            if action.choices else action.dest.upper()))
    text = (action.help or "").replace("%(prog)s", "lora-jax")
    if action.choices and action.option_strings and action.metavar:
        text += f" Choices: {', '.join(map(str, action.choices))}."
    shown = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
    if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings \
            and "default" not in text and f"({shown})" not in text:
        text += f" Default: {shown}."
    if action.required and action.option_strings:
        text += " Required."
    if action.__class__.__name__ == "_AppendAction":
        text += " May be repeated."
    return nodes.definition_list_item(
        "", nodes.term("", "", nodes.literal(flags, flags)),
        nodes.definition("", nodes.paragraph(text, text)))


class CliReference(SphinxDirective):
    """`lora-jax-cli`: each subcommand's usage and options, from `build_parser()`."""

    def run(self) -> list[nodes.Node]:
        from lora_jax.cli.main import build_parser

        parser = build_parser()
        (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        helps = {a.dest: a.help for a in sub._choices_actions}
        out: list[nodes.Node] = []
        for name, command in sub.choices.items():
            section = nodes.section(ids=[f"cli-{name}"], names=[f"lora-jax {name}"])
            title = f"lora-jax {name}"
            section += nodes.title(title, "", nodes.literal(title, title))
            section += nodes.paragraph(helps.get(name, ""), helps.get(name, ""))
            usage = command.format_usage().removeprefix("usage: ").strip()
            section += nodes.literal_block(usage, usage, language="text")
            options = nodes.definition_list()
            for action in command._actions:
                if not isinstance(action, argparse._HelpAction):
                    options += _option(action)
            section += options
            self.state.document.note_implicit_target(section)
            out.append(section)
        return out


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_transform(TabbedCells)
    app.connect("autodoc-process-docstring", readable_rst)
    app.add_directive("lora-jax-api", PublicApi)
    app.add_directive("lora-jax-cli", CliReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
