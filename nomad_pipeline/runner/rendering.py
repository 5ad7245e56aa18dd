"""Turning a step's templates into a script and an environment, without injection.

Values never enter the script's text. Every ``${name}`` in a script becomes a read of an
environment variable (``${var.go_version}`` → ``NP_VAR_GO_VERSION``) whose value is the rendered
value, so the shell expands it as data: a value such as ``$(touch /tmp/pwned)`` or
``'; rm -rf ~; '`` is printed, never run.

The read is written so the value stays one word, exactly where the template put it (as the
seed, which pastes values into the text, would show it). A small shell-quoting scanner decides
the form from where the reference sits:

- in ordinary command text (also inside ``$(...)``, ``$((...))``, backticks, subshells,
  ``${x:-...}`` and here-strings): ``"${NP_VAR_X}"``, so the value is neither word-split nor
  glob-expanded;
- inside double quotes, and in the body of an unquoted heredoc (``<<EOF``): ``${NP_VAR_X}``;
- inside single quotes: the quote is closed, the value read in double quotes and the quote
  reopened (``'a ${var.x} b'`` → ``'a '"${NP_VAR_X}"' b'``), likewise inside ``$'...'``;
- in a comment: ``${NP_VAR_X}`` (inert);
- in the body of a quoted heredoc (``<<'EOF'``, ``<<"EOF"``, ``<<\\EOF``): ``${NP_VAR_X}`` as
  text. A quoted heredoc does not expand variables, in any shell, so the body shows the
  variable's name, not its value; use an unquoted heredoc to get the value.

A backslash right before a reference is read as escaping an ordinary letter: dropped in command
text, kept as a literal backslash inside double quotes and unquoted heredocs. ``$${`` is a
literal ``${`` (``$${HOME}`` is the shell's own ``${HOME}``). A reference cannot be a heredoc's
delimiter. Contexts that evaluate text as an expression (``$(( ))``, ``[[ a -eq b ]]``) evaluate
values there too, as in any shell: keep untrusted values out of arithmetic.

Step ``env`` values are templates too; they are rendered to plain text and only ever reach the
process environment (an environment value cannot be code). Every step also sees the run's
variables as ``NP_VAR_<NAME>`` (upper case, anything but letters and digits as ``_``), trigger
values as ``NP_TRIGGER_<NAME>``, and ``NP_RUN_ID``, ``NP_RUN_NAME``, ``NP_RUN_NAMESPACE``,
``NP_RUN_FLOW``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.templates import render, render_value, substitute

_NOT_ENV_CHARACTER = re.compile(r"[^A-Z0-9]+")
# Template names whose canonical variable is not derived from the name itself.
_ALIASES = {"nomad_pipeline.run_id": "NP_RUN_ID"}

# A script is a process argument, so it can never hold a NUL: the scanner marks references
# with NUL-delimited indexes, which cannot collide with the script's own text.
_MARK = "\x00"
# Forms of a variable read, by where the reference sits (see the module docstring).
_QUOTED = '"${{{}}}"'
_BARE = "${{{}}}"
_IN_SINGLE_QUOTES = "'\"${{{}}}\"'"
_IN_ANSI_QUOTES = "'\"${{{}}}\"$'"
# Characters after which a ``#`` starts a comment.
_WORD_BREAKS = frozenset(" \t\n;&|()<>")


def environment_name(reference: str) -> str:
    """``var.trigger.git_sha`` → ``NP_VAR_TRIGGER_GIT_SHA``; ``run.id`` → ``NP_RUN_ID``."""
    alias = _ALIASES.get(reference)
    if alias is not None:
        return alias
    return "NP_" + _NOT_ENV_CHARACTER.sub("_", reference.upper()).strip("_")


def run_environment(
    variables: Mapping[str, Any], run: Mapping[str, Any], trigger: Mapping[str, Any]
) -> dict[str, str]:
    """What every step of the run sees besides the runner's own environment."""
    env: dict[str, str] = {}
    for name, value in variables.items():
        env[environment_name(f"var.{name}")] = render_value(value)
    trigger_values = dict(trigger)
    # Webhook values arrive as run variables named trigger.<name> (as in the seed).
    for name, value in variables.items():
        if name.startswith("trigger."):
            trigger_values.setdefault(name.removeprefix("trigger."), value)
    for name, value in trigger_values.items():
        env[environment_name(f"trigger.{name}")] = render_value(value)
    for name, value in run.items():
        env[environment_name(f"run.{name}")] = render_value(value)
    return env


def render_step(
    script: str, env_templates: Mapping[str, str], context: Mapping[str, Any]
) -> tuple[str, dict[str, str]]:
    """The script with references turned into variable reads, and the variables they read.

    Raises Invalid (from the template module) for malformed templates or unknown names, and
    for a NUL character, which no process argument or environment value can hold.
    """
    if _MARK in script:
        raise Invalid(f"the step's script holds a NUL character at position {script.index(_MARK)}")
    env: dict[str, str] = {}
    for env_name, template in env_templates.items():
        env[env_name] = render(template, context)
        if _MARK in env[env_name]:
            raise Invalid(f"env {env_name!r} renders to a value holding a NUL character")
    bound: dict[str, str] = {}
    reads: list[str] = []

    def bind(reference: str) -> str:
        value = render("${" + reference + "}", context)
        if _MARK in value:
            raise Invalid(f"the value of {reference!r} holds a NUL character")
        name = environment_name(reference)
        if bound.get(name, value) != value:
            # Two references that spell the same variable name (var.a_b and var.a.b) but hold
            # different values: give the later one a name of its own.
            name = f"{name}_{len(bound)}"
        bound[name] = value
        reads.append(name)
        return f"{_MARK}{len(reads) - 1}{_MARK}"

    marked = substitute(script, bind)
    rendered = _quote_references(marked, reads) if reads else marked
    return rendered, {**env, **bound}


def _quote_references(marked: str, names: list[str]) -> str:
    """Replace each mark (NUL, index into ``names``, NUL) by a read of that variable.

    The form of each read follows the shell context the mark sits in; everything else in
    ``marked`` is copied unchanged (but a backslash right before a mark, see the module).
    """
    scanner = _Scanner(marked, names)
    scanner.command_text(0, terminator=None)
    return "".join(scanner.out)


@dataclass(frozen=True, slots=True)
class _Heredoc:
    delimiter: str
    quoted: bool
    strip_tabs: bool


class _Scanner:
    """Walks a marked script once, keeping its text and rewriting marks by quoting context.

    Each method scans one context from position ``i`` (just after its opening token), appends
    what it read to ``out`` and returns the position after its closing token.
    """

    def __init__(self, text: str, names: list[str]) -> None:
        self.text = text
        self.names = names
        self.out: list[str] = []
        self.heredocs: list[_Heredoc] = []

    def read(self, i: int, form: str) -> int:
        end = self.text.index(_MARK, i + 1)
        self.out.append(form.format(self.names[int(self.text[i + 1 : end])]))
        return end + 1

    def escape(self, i: int, *, in_double_quotes: bool) -> int:
        """A backslash at ``i``: copy it with the character it escapes."""
        if self.text.startswith(_MARK, i + 1):
            # The reference's value is taken as starting with an ordinary letter, which a
            # backslash leaves as is: dropped in command text, literal inside double quotes.
            if in_double_quotes:
                self.out.append("\\\\")
            return i + 1
        self.out.append(self.text[i : i + 2])
        return i + 2

    def dollar(self, i: int, *, in_double_quotes: bool) -> int | None:
        """An expansion starting at ``i`` (``$(``, ``${``); None when ``$`` starts none."""
        if self.text.startswith("((", i + 1):
            self.out.append("$((")
            return self.arithmetic(i + 3)
        following = self.text[i + 1 : i + 2]
        if following == "(":
            self.out.append("$(")
            return self.command_text(i + 2, terminator=")")
        if following == "{":
            self.out.append("${")
            return self.parameter(i + 2, in_double_quotes=in_double_quotes)
        return None

    def command_text(self, i: int, *, terminator: str | None) -> int:
        """Ordinary shell text up to ``terminator`` (``)`` of ``$(``, a backtick, or the end)."""
        text = self.text
        depth = 0
        word_start = True
        while i < len(text):
            char = text[i]
            if char == _MARK:
                i = self.read(i, _QUOTED)
            elif char == "\\":
                i = self.escape(i, in_double_quotes=False)
            elif char == "'":
                self.out.append(char)
                i = self.single_quoted(i + 1, _IN_SINGLE_QUOTES)
            elif char == '"':
                self.out.append(char)
                i = self.double_quoted(i + 1)
            elif char == "`":
                self.out.append(char)
                if terminator == "`":
                    return i + 1
                i = self.command_text(i + 1, terminator="`")
            elif char == "$":
                following = text[i + 1 : i + 2]
                if following == "'":
                    self.out.append("$'")
                    i = self.single_quoted(i + 2, _IN_ANSI_QUOTES)
                elif following == '"':
                    self.out.append('$"')
                    i = self.double_quoted(i + 2)
                else:
                    after = self.dollar(i, in_double_quotes=False)
                    if after is None:
                        self.out.append(char)
                        after = i + 1
                    i = after
            elif word_start and text.startswith("((", i):
                self.out.append("((")
                i = self.arithmetic(i + 2)
            elif char == "#" and word_start:
                i = self.comment(i)
            elif text.startswith("<<<", i):
                self.out.append("<<<")
                i += 3
            elif text.startswith("<<", i):
                i = self.heredoc_operator(i)
            elif char == "\n":
                self.out.append(char)
                i = self.heredoc_bodies(i + 1)
            else:
                if char == "(":
                    depth += 1
                elif char == ")" and terminator == ")":
                    if depth == 0:
                        self.out.append(char)
                        return i + 1
                    depth -= 1
                self.out.append(char)
                i += 1
            word_start = char in _WORD_BREAKS
        return i

    def arithmetic(self, i: int) -> int:
        """``$((...))`` or ``((...))``: no words, comments or heredocs (``<<`` shifts bits)."""
        text = self.text
        depth = 0
        while i < len(text):
            char = text[i]
            if char == _MARK:
                i = self.read(i, _QUOTED)
            elif char == "\\":
                i = self.escape(i, in_double_quotes=False)
            elif char == '"':
                self.out.append(char)
                i = self.double_quoted(i + 1)
            elif char == "`":
                self.out.append(char)
                i = self.command_text(i + 1, terminator="`")
            elif char == "$" and (after := self.dollar(i, in_double_quotes=False)) is not None:
                i = after
            elif depth == 0 and text.startswith("))", i):
                self.out.append("))")
                return i + 2
            else:
                depth += (char == "(") - (char == ")")
                self.out.append(char)
                i += 1
        return i

    def single_quoted(self, i: int, form: str) -> int:
        """``'...'`` (form _IN_SINGLE_QUOTES) or ``$'...'`` (backslash escapes; _IN_ANSI_QUOTES)."""
        text = self.text
        while i < len(text):
            char = text[i]
            if char == _MARK:
                i = self.read(i, form)
            elif char == "\\" and form == _IN_ANSI_QUOTES:
                i = self.escape(i, in_double_quotes=False)
            else:
                self.out.append(char)
                i += 1
                if char == "'":
                    return i
        return i

    def double_quoted(self, i: int, *, closing: str | None = '"') -> int:
        """Text where ``$`` and backquotes expand but words do not split, up to ``closing``
        (a double quote; None for an unquoted heredoc body, where ``"`` is ordinary)."""
        text = self.text
        while i < len(text):
            char = text[i]
            if char == _MARK:
                i = self.read(i, _BARE)
            elif char == "\\":
                i = self.escape(i, in_double_quotes=True)
            elif char == "`":
                self.out.append(char)
                i = self.command_text(i + 1, terminator="`")
            elif char == "$" and (after := self.dollar(i, in_double_quotes=True)) is not None:
                i = after
            else:
                self.out.append(char)
                i += 1
                if char == closing:
                    return i
        return i

    def parameter(self, i: int, *, in_double_quotes: bool) -> int:
        """``${...}``: its word (``${x:-word}``) is quoted as the text around the expansion."""
        text = self.text
        while i < len(text):
            char = text[i]
            if char == _MARK:
                i = self.read(i, _BARE if in_double_quotes else _QUOTED)
            elif char == "\\":
                i = self.escape(i, in_double_quotes=in_double_quotes)
            elif char == "'" and not in_double_quotes:
                self.out.append(char)
                i = self.single_quoted(i + 1, _IN_SINGLE_QUOTES)
            elif char == '"':
                self.out.append(char)
                i = self.double_quoted(i + 1)
            elif char == "`":
                self.out.append(char)
                i = self.command_text(i + 1, terminator="`")
            elif (
                char == "$"
                and (after := self.dollar(i, in_double_quotes=in_double_quotes)) is not None
            ):
                i = after
            else:
                self.out.append(char)
                i += 1
                if char == "}":
                    return i
        return i

    def comment(self, i: int) -> int:
        end = self.text.find("\n", i)
        end = len(self.text) if end < 0 else end
        self.out.append(_replace_marks(self.text[i:end], self.names, _BARE))
        return end

    def heredoc_operator(self, i: int) -> int:
        """``<<WORD`` or ``<<-WORD``: note the heredoc; its body starts at the next line."""
        text = self.text
        start = i
        i += 2
        strip_tabs = text.startswith("-", i)
        i += strip_tabs
        while i < len(text) and text[i] in " \t":
            i += 1
        delimiter: list[str] = []
        quoted = False
        while i < len(text) and text[i] not in _WORD_BREAKS:
            char = text[i]
            if char == _MARK:
                end = text.index(_MARK, i + 1)
                read = self.names[int(text[i + 1 : end])]
                raise Invalid(
                    f"a template reference (read as ${{{read}}}) cannot be a heredoc delimiter: "
                    "write the delimiter literally"
                )
            if char in "'\"":
                quoted = True
                close = text.find(char, i + 1)
                close = len(text) if close < 0 else close
                delimiter.append(text[i + 1 : close])
                i = close + 1
            elif char == "\\":
                quoted = True
                delimiter.append(text[i + 1 : i + 2])
                i += 2
            else:
                delimiter.append(char)
                i += 1
        self.out.append(text[start:i])
        if delimiter:
            self.heredocs.append(_Heredoc("".join(delimiter), quoted, strip_tabs))
        return i

    def heredoc_bodies(self, i: int) -> int:
        """After a newline: the bodies of the heredocs opened on the line it ends, in order."""
        text = self.text
        pending, self.heredocs = self.heredocs, []
        for heredoc in pending:
            body_start = i
            end_line = None
            while i < len(text):
                line_end = text.find("\n", i)
                line_end = len(text) if line_end < 0 else line_end
                line = text[i:line_end]
                if (line.lstrip("\t") if heredoc.strip_tabs else line) == heredoc.delimiter:
                    end_line = (i, min(line_end + 1, len(text)))
                    break
                i = line_end + 1
            body_end = end_line[0] if end_line else len(text)
            body = text[body_start:body_end]
            if heredoc.quoted:
                self.out.append(_replace_marks(body, self.names, _BARE))
            else:
                self.out.append(_Scanner(body, self.names).unquoted_heredoc_body())
            if end_line is None:
                return len(text)
            self.out.append(text[end_line[0] : end_line[1]])
            i = end_line[1]
        return i

    def unquoted_heredoc_body(self) -> str:
        """As double quotes, but a ``"`` is an ordinary character."""
        self.double_quoted(0, closing=None)
        return "".join(self.out)


def _replace_marks(text: str, names: list[str], form: str) -> str:
    return re.sub(f"{_MARK}(\\d+){_MARK}", lambda match: form.format(names[int(match[1])]), text)
