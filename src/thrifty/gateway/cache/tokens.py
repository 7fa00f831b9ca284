"""Words as the semantic cache's guard compares them: normalised text, tokens that keep their symbols,
numbers as values, names and code identifiers, and word likeness (inflection, typos, synonyms).

Tokens keep the symbols that make a different name: "c", "c++", "c#", "f#", ".net", "node.js", "ipv4",
"x86" are six tokens, and a token with a digit or a symbol in it is never forgiven as a typo of another
("ipv4" / "ipv6", "c#" / "f#", "py2" / "py3" differ by one character and by everything that matters).
"""
from __future__ import annotations

import os
import re
import unicodedata
import zlib
from functools import lru_cache

from thrifty.gateway.cache.lexicon import (BARE, CONTRACTIONS, IRREGULAR, LEADING_FILLER, MONTHS, NUM, PERIODS,
                                           PHRASES, RAW_TOKEN, SYNONYM, UNITS, WORD)


def normalize(text: str) -> str:
    """Lower case, NFKC, contractions expanded, greetings and hedges at the start dropped, hyphens split:
    the form words are compared in."""
    t = unicodedata.normalize("NFKC", text).lower().strip()
    t = LEADING_FILLER.sub("", t)
    t = re.sub(r"^(?:but|and|so)\s+", "", t)
    for pat, rep in CONTRACTIONS:
        t = re.sub(pat, rep, t)
    t = re.sub(r"[a-z]+", lambda m: BARE.get(m.group(0), m.group(0)), t)
    t = t.replace("-", " ").replace("/", " ")
    for pat, rep in PHRASES:
        t = re.sub(pat, rep, t)
    return t


def words(text: str) -> list[str]:
    return list(_words(text))


@lru_cache(maxsize=8192)
def _words(text: str) -> tuple[str, ...]:
    """One normalisation per text: a check reads the words of both texts several times, and the stored
    side's text recurs across look-ups."""
    return tuple(WORD.findall(normalize(text)))


def stem(w: str) -> str:
    if w in IRREGULAR:
        return IRREGULAR[w]
    if not w.isalpha():
        return w  # "node.js", "c#", "ipv4": a name, not an inflected word
    for suf in ("ing", "ies", "es", "ed", "s", "ly"):
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            base = w[: -len(suf)]
            return base + "y" if suf == "ies" else base
    return w


def close(a: str, b: str) -> bool:
    """Same word up to inflection or a one-edit typo (two edits in long words). Tokens with digits or
    symbols must be equal: "ipv4" is no typo of "ipv6", nor "c#" of "f#"."""
    if a == b:
        return True
    if not (a.isalpha() and b.isalpha()):
        return False
    if stem(a) == stem(b):
        return True
    common = len(os.path.commonprefix([a, b]))
    if common >= 4 and common >= 0.7 * min(len(a), len(b)) and abs(len(a) - len(b)) <= 4:
        return True  # derived forms: quote / quotation, agent / agency
    if min(len(a), len(b)) < 4 or a[0] != b[0] and a[1:2] != b[1:2]:
        return False
    budget = 2 if min(len(a), len(b)) >= 8 else 1
    return _edit_distance(a, b, budget) <= budget


def _edit_distance(a: str, b: str, cap: int) -> int:
    """Damerau-Levenshtein (adjacent swaps count 1), stopping early above `cap`."""
    if abs(len(a) - len(b)) > cap:
        return cap + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > cap:
            return cap + 1
        prev2, prev = prev, cur
    return prev[-1]


def _code(token: str) -> float:
    """A number-like token that is no number ("11.2.0", "10:3.2.1"): equal tokens match, different ones do not,
    and no real number collides (codes live above 2e12). crc32, not hash(), so every process agrees."""
    return 2e12 + zlib.crc32(token.encode())


def numbers(text: str) -> list[float]:
    """Every number in the text: digits (1,000 / 9:15 / 3rd / 2-hour) and number words, sorted."""
    out: list[float] = []
    t = unicodedata.normalize("NFKC", text).lower()
    for m in NUM.finditer(t):
        s = m.group(0)
        pm = re.match(r"\s*(am|pm|a\.m\.|p\.m\.)(?![a-z])", t[m.end():])
        if pm:  # clock times: "2pm" == "14:00"
            h, _, mins = s.partition(":")
            try:
                hour = float(h) % 12 + (12 if pm.group(1).startswith("p") else 0)
                out.append(hour * 100 + float(mins or 0))
                continue
            except ValueError:
                pass
        if ":" in s:
            h, _, rest = s.partition(":")
            try:
                out.append(float(h) * 100 + float(rest.replace(":", "") or 0))
            except ValueError:
                out.append(_code(s))
            continue
        s = s.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", s) else s.replace(",", ".")
        try:
            out.append(float(s))
        except ValueError:
            out.append(_code(s))
    ws = words(t.replace("-", " "))
    for i, w in enumerate(ws):
        if w == "one" and _pronoun_one(ws, i):
            continue
        if w in UNITS and UNITS[w] is not None and not NUM.fullmatch(w):
            out.append(float(UNITS[w]))
        elif w in MONTHS:  # a date word is a number of its own kind; plural == singular
            key = w[:-1] if w.endswith("s") and w[:-1] in MONTHS else w
            key = PERIODS.get(key, key)
            key = {"weekday": "weekday", "weekend": "weekend"}.get(key, key[:3] if len(key) > 6 else key)
            out.append(float(1e12 + sum(ord(c) * 31 ** i for i, c in enumerate(key)) % 10**9))
    return sorted(out)


def _pronoun_one(ws: list[str], i: int) -> bool:
    """"one" standing for a thing ("a new one", "one of my tablets", "on my own"), not a count."""
    before = ws[i - 1] if i else ""
    after = ws[i + 1] if i + 1 < len(ws) else ""
    return before in ("a", "the", "this", "that", "which", "new", "another", "each", "any", "every", "no", "old",
                      "right", "wrong", "other") or after in ("of", "", "or")


def names(text: str) -> list[str]:
    """Names and code identifiers in order: capitalised words inside a sentence, acronyms, snake_case,
    camelCase, dotted names, words with digits, names with symbols (C++, C#, .NET), calls (`sorted(`),
    anything in backticks."""
    t = unicodedata.normalize("NFKC", text)
    out: list[str] = [m.lower() for m in re.findall(r"`([^`]+)`", t)]
    sentence_start = True
    for m in RAW_TOKEN.finditer(t):
        tok = m.group(0).rstrip(".,:;'’")
        before = t[max(0, m.start() - 2):m.start()]
        if m.start() == 0 or re.search(r"[.!?\n]\s*$", before):
            sentence_start = True
        base = re.sub(r"['’]s$", "", tok)
        is_code = bool(re.search(r"[a-z][A-Z]|_|[A-Za-z]\.[A-Za-z]|[A-Za-z]\d|\d[A-Za-z]{2,}", base)) \
            and not re.fullmatch(r"\d+(st|nd|rd|th|s|am|pm|k|kg|g|m|km|mb|gb|tb|ml|l)", base.lower())
        is_acronym = len(base) >= 2 and base.isupper() and base.isalpha() and base not in ("OK", "AM", "PM")
        is_name = (base[:1].isupper() and not re.fullmatch(r"I(['’](m|ve|d|ll))?|OK|Ok", base)
                   and not sentence_start)
        is_code = is_code or bool(re.search(r"[+#]$|^\.[A-Za-z]", base)) or t[m.end():m.end() + 1] == "("
        if base.lower() in MONTHS or base.lower().rstrip("s") in MONTHS:
            is_name = is_acronym = is_code = False  # dates are compared as numbers
        if is_code or is_acronym or is_name:
            out.append(base.lower())
        sentence_start = False
    return out


def canon(w: str) -> str | None:
    for f in (w, stem(w), stem(w) + "e", w[:-1] if w.endswith("s") else w, *_comparative_bases(w)):
        if f in SYNONYM:
            return SYNONYM[f]
    return None


def _comparative_bases(w: str) -> tuple[str, ...]:
    """"faster" -> fast, "bigger" -> big, "larger" -> large: comparatives share their base's synonyms."""
    for suf in ("er", "est"):
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            base = w[: -len(suf)]
            undoubled = base[:-1] if base[-1] == base[-2] else base
            return base, undoubled, base + "e"
    return ()


def synonyms(a: str, b: str) -> bool:
    """Both words sit in one group of the general synonym lexicon (inflections forgiven)."""
    ca = canon(a)
    return ca is not None and ca == canon(b)


def contains(ws: list[str], name: str) -> bool:
    parts = words(name)
    if not parts:
        return True
    n = len(parts)
    return any(ws[i:i + n] == parts for i in range(len(ws) - n + 1))



def same(a: str, b: str) -> bool:
    """One word for the guard: equal, inflected, a typo, or synonyms."""
    return close(a, b) or synonyms(a, b)

