"""Checks on a model's code answer that need no reference solution: it parses, and the examples the prompt
itself gives (doctest `>>> f(x)` lines; `f(x) == y`, `f(x) ==> y`, `f(x) ➞ y` and the like) pass when run in the sandbox.

The cascade escalates an answer that fails them; the HumanEval labels use the same pieces with the
problem's hidden unit tests instead of the prompt's examples.
"""
from __future__ import annotations

import ast
import doctest
import re
from dataclasses import dataclass

from thrifty.gateway.sandbox import SandboxResult, run_python

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
# A call and what it gives, anywhere on a line ("- f(1) == 2", "Example: f(3) == 10.", "e.g. f(x) -> y").
_INLINE_EXAMPLE = re.compile(r"(?:^|(?<=[\s:,]))([A-Za-z_]\w*\(.*\))\s*"
                             r"(?:==>|==|=>|->|➞|=|returns|should return)\s*(.+?)\s*$")


@dataclass(slots=True)
class CodeCheck:
    has_code: bool
    parses: bool
    examples: int             # examples found in the prompt
    passed: bool              # parses and every example passed (True with no examples when it parses)
    detail: str

    @property
    def reason(self) -> str:
        if not self.has_code:
            return "no code"
        if not self.parses:
            return "code does not parse"
        if not self.passed:
            return "examples failed" if self.examples else "code fails to run"
        return f"{self.examples} examples pass" if self.examples else "code parses"


def extract_code(answer: str) -> str | None:
    """The Python in an answer: its fenced blocks (python ones first), else the whole text if it parses."""
    blocks = _FENCE.findall(answer)
    if blocks:
        python = [code for lang, code in blocks if lang.lower() in ("python", "py", "python3", "")]
        return "\n\n".join(python or [code for _, code in blocks]).strip("\n") or None
    text = answer.strip("\n")
    return text if text and _parses(text) and ("def " in text or "import " in text) else None


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def defined_functions(code: str) -> set[str]:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return set()
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _docstrings(code: str) -> list[str]:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return [doc for n in nodes if (doc := ast.get_docstring(n))]


def prompt_examples(prompt: str) -> list[tuple[str, str]]:
    """(expression, expected) pairs the prompt shows; only pairs whose both sides parse as Python. Looks in
    the docstrings of the prompt's code when it has some, else in the whole text."""
    code = extract_code(prompt)
    texts = (_docstrings(code) if code else []) or [prompt]
    found: list[tuple[str, str]] = []
    for text in texts:
        try:
            found += [(ex.source.strip(), ex.want.strip()) for ex in doctest.DocTestParser().get_examples(text)]
        except ValueError:  # inconsistent indentation: the line patterns below still apply
            pass
    if not found:
        for text in texts:
            found += [(m.group(1), m.group(2).rstrip(".,;")) for line in text.splitlines()
                      if (m := _INLINE_EXAMPLE.search(line))]
    return [(src, want) for src, want in found
            if want and "\n" not in want and "\n" not in src and _parses(src) and _parses(want) and src != want]


def complete_program(prompt_code: str | None, answer_code: str, entry_point: str | None) -> str:
    """The answer as a runnable module: when it does not define the entry point itself (a bare function body
    or helpers only), it continues the prompt's code."""
    if prompt_code and entry_point and entry_point not in defined_functions(answer_code):
        return prompt_code + answer_code
    # keep the prompt's imports and helpers the answer may rely on (HumanEval prompts import typing)
    imports = "\n".join(line for line in (prompt_code or "").splitlines() if line.startswith(("import ", "from ")))
    return (imports + "\n\n" if imports else "") + answer_code


def examples_program(code: str, examples: list[tuple[str, str]]) -> str:
    checks = "\n".join(f"assert ({src}) == ({want}), {src!r}" for src, want in examples)
    return f"{code}\n\n{checks}\n"


def check_answer(prompt: str, answer: str, timeout_s: float = 5.0, memory_mb: int = 512) -> CodeCheck:
    """Parse the answer's code and run the prompt's examples against it in the sandbox."""
    code = extract_code(answer)
    if code is None:
        return CodeCheck(False, False, 0, False, "no code in the answer")
    prompt_code = extract_code(prompt)
    examples = prompt_examples(prompt)
    entry = next((src.split("(")[0] for src, _ in examples), None)
    program = complete_program(prompt_code, code, entry)
    if not _parses(program):
        return CodeCheck(True, False, len(examples), False, "syntax error")
    result: SandboxResult = run_python(examples_program(program, examples), timeout_s, memory_mb)
    detail = "timed out" if result.timed_out else result.output.strip().splitlines()[-1:] or [""]
    return CodeCheck(True, True, len(examples), result.ok, detail if isinstance(detail, str) else detail[0])
