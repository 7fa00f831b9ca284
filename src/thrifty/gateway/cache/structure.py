"""Structure the guard compares beyond a bag of words: who is on which side of a relation, in what order,
with which operators and in which letter case.

Two questions with the same words can ask opposite things:
- direction: "convert a list to a string" / "convert a string to a list", "merge main into my branch" /
  "merge my branch into main", "how many bytes in a kilobyte" / "how many kilobytes in a byte";
- the two sides of a comparison or a unit: "is Python faster than Java" / "is Java faster than Python",
  "port 8080 of the container to port 80" / "port 80 of the container to port 8080";
- subject and predicate of a quantified statement: "is every square a rectangle" / "is every rectangle a
  square";
- operators ("== and ===" / "= and =="), and units whose case is the meaning ("MBps" / "Mbps").
Each check returns why the two differ, or None. A check only refuses when both texts show the same
relation with its parts exchanged (or one part replaced by a word the other text also holds), so a
paraphrase that drops or rephrases a relation is left to the word comparison.
"""
from __future__ import annotations

import re
from collections import Counter

from thrifty.gateway.cache.lexicon import FILLER, LIGHT, NEGATIONS, RAW_TOKEN, STOP
from thrifty.gateway.cache.tokens import close, same

# Words that tie the phrase before them to the phrase after them, in a direction.
MARKERS = frozenset({"to", "into", "onto", "from", "than", "in", "per", "of", "over", "vs", "versus"})
# Markers whose sides are roles a word cannot change without changing the question ("from A to B", "faster
# than B"); a loose one such as "in" or "of" only counts when its two sides are exchanged.
ROLE_MARKERS = frozenset({"to", "into", "onto", "from", "than", "over", "per", "vs", "versus"})
QUANTIFIERS = frozenset({"every", "all", "each"})
_DETERMINERS = frozenset({"a", "an", "the", "my", "your", "our", "their", "its", "his", "her", "this", "that",
                          "these", "those", "some"})
_COPULAS = frozenset({"is", "are", "was", "were", "be", "there"})   # "bytes (are) in a kilobyte"
_RUN = 4  # longest phrase read on either side of a marker

_OPERATORS = re.compile(r"===?|!==?|<=|>=|=>|->|&&|\|\||\*\*|:=|[+\-*/]=|\+\+|(?<![=!<>:+\-*/])=(?![=>])")


def _bare(ws: list[str]) -> list[str]:
    """Words without fillers and hedges: they sit between a noun and its marker without changing roles."""
    return [w for w in ws if w not in FILLER and w not in LIGHT]


def _is_content(w: str) -> bool:
    return w not in STOP and w not in NEGATIONS and w not in MARKERS


def _run_after(ws: list[str], i: int) -> list[str]:
    """The phrase after the marker at i ("to my current account" -> current, account)."""
    j = i + 1
    while j < len(ws) and j <= i + 3 and ws[j] in _DETERMINERS:
        j += 1
    run: list[str] = []
    while j < len(ws) and len(run) < _RUN and _is_content(ws[j]):
        run.append(ws[j])
        j += 1
    return run


def _run_before(ws: list[str], i: int) -> list[str]:
    """The phrase before the marker at i, a copula skipped ("bytes are in" -> bytes)."""
    j = i - 1
    while j >= 0 and j >= i - 2 and ws[j] in _COPULAS:
        j -= 1
    run: list[str] = []
    while j >= 0 and len(run) < _RUN and _is_content(ws[j]):
        run.insert(0, ws[j])
        j -= 1
    return run


def relations(ws: list[str]) -> list[tuple[str, str, str]]:
    """(marker, head before, head after) for every marker with a phrase on both sides. The head of a
    phrase is its last word: "python 2 script" -> script, "numpy array" -> array, "python 3" -> 3."""
    ws = _bare(ws)
    out = []
    for i, w in enumerate(ws):
        if w in MARKERS:
            left, right = _run_before(ws, i), _run_after(ws, i)
            if left and right:
                out.append((w, left[-1], right[-1]))
    return out


def _has(ws: list[str], w: str) -> bool:
    return any(same(w, x) for x in ws)


def relation_conflict(wa: list[str], wb: list[str]) -> str | None:
    """The same marker with its sides exchanged, or with one side replaced by a word of the other text."""
    ra, rb = relations(wa), relations(wb)
    for m, l1, r1 in ra:
        for m2, l2, r2 in rb:
            if m != m2:
                continue
            if same(l1, r2) and same(r1, l2) and not same(l1, r1):
                return f"direction: '{l1} {m} {r1}' vs '{l2} {m} {r2}'"
            if m not in ROLE_MARKERS:
                continue
            if same(l1, l2) and not same(r1, r2) and _has(wb, r1) and _has(wa, r2):
                return f"roles: '{l1} {m} {r1}' vs '{l2} {m} {r2}'"
            if same(r1, r2) and not same(l1, l2) and _has(wb, l1) and _has(wa, l2):
                return f"roles: '{l1} {m} {r1}' vs '{l2} {m} {r2}'"
    return None


def _after_quantifier(ws: list[str]) -> list[str] | None:
    """The content words after "every/all/each" in a statement of kind ("is every X a Y", "are all X Y",
    "every X is a Y"); None for any other use of the quantifier ("list all running containers")."""
    ws = _bare(ws)
    for i, w in enumerate(ws):
        if w in QUANTIFIERS:
            j = i + 1
            while j < len(ws) and _is_content(ws[j]):
                j += 1
            if ws[0] in _COPULAS or (j < len(ws) and j > i + 1 and ws[j] in _COPULAS):
                return [x for x in ws[i + 1:] if _is_content(x)]
            return None
    return None


def quantifier_order(wa: list[str], wb: list[str]) -> str | None:
    """"every X is a Y" vs "every Y is an X": the words after the quantifier, in another order."""
    sa, sb = _after_quantifier(wa), _after_quantifier(wb)
    if sa is None or sb is None:
        return None
    positions = []
    for w in sa:
        j = next((j for j, v in enumerate(sb) if same(w, v)), None)
        if j is not None:
            positions.append(j)
    if positions != sorted(positions):
        return "order after a quantifier differs"
    return None


def quantifier_scope(wa: list[str], wb: list[str]) -> str | None:
    """"rename a column" vs "rename all columns": one side quantifies a noun that the other names in the
    singular (or the plural) without a quantifier: one thing against all of them."""
    for x, y in ((_bare(wa), _bare(wb)), (_bare(wb), _bare(wa))):
        if any(w in QUANTIFIERS for w in y):
            continue
        for i, w in enumerate(x):
            if w not in QUANTIFIERS:
                continue
            for q in _run_after(x, i):
                if any(v != q and v.isalpha() and close(v, q) for v in y):
                    return f"scope: '{w} {q}'"
    return None


def operators(text: str) -> list[str]:
    """Operator tokens ("==", "===", "->", "++"), sorted: the normalised words drop them."""
    return sorted(_OPERATORS.findall(text))


def operator_conflict(a: str, b: str) -> str | None:
    oa, ob = operators(a), operators(b)
    if oa != ob:
        diff = (Counter(oa) - Counter(ob)) + (Counter(ob) - Counter(oa))
        return f"operators differ: {' '.join(sorted(diff))}"
    return None


def _mixed_case(s: str) -> bool:
    """Capitals inside a word ("MBps", "GiB", "GitHub"): the case is part of what it says."""
    return s not in (s.lower(), s.upper(), s.capitalize())


def case_conflict(a: str, b: str) -> str | None:
    """The same word written in two cases where the case carries meaning ("MBps" vs "Mbps"). A side that
    writes the word all in lower case made no claim about case ("TensorFlow" / "tensorflow" agree)."""
    forms_a: dict[str, set[str]] = {}
    for m in RAW_TOKEN.finditer(a):
        forms_a.setdefault(m.group(0).lower(), set()).add(m.group(0))
    for m in RAW_TOKEN.finditer(b):
        sb = m.group(0)
        for sa in forms_a.get(sb.lower(), ()):
            if sa != sb and sa != sa.lower() and sb != sb.lower() and (_mixed_case(sa) or _mixed_case(sb)):
                return f"letter case differs: '{sa}' vs '{sb}'"
    return None
