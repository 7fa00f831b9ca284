"""The semantic cache's guard: is a stored question close enough to a new one to share its answer?

Cosine similarity of MiniLM embeddings alone cannot decide it: a one-word edit ("open" -> "closed",
"Oxford" -> "Leeds", "2-hour" -> "4-hour", "C" -> "C++") keeps the cosine at 0.95-0.99, and so does a
reversal ("convert a list to a string" / "a string to a list"), while a real rewording of the same question
often scores only 0.75-0.85. So the guard compares the two texts' structure first and uses the cosine only
for what that cannot settle. Words are read by `tokens.py` (symbols kept: "c", "c++", "c#", ".net",
"node.js", "ipv4" are different tokens, never typos of one another).

1. Hard facts must agree (any mismatch: no hit, whatever the cosine):
   - numbers: digits, number words and ordinals, as a multiset ("two-bed" == "2 bed" != "five-bedroom");
   - polarity: the negation words (not, no, never, without, ... after expanding n't), and words that are
     another word of the pair with a negating prefix ("unarchive" vs "archive", "unsafe" vs "safe");
   - opposites: a lexicon of antonym pairs (open/closed, enable/disable, encode/decode, add/remove, ...);
   - names and code: capitalised words inside a sentence, acronyms, identifiers (snake_case, camelCase,
     dotted.names, calls, words with digits or symbols) must each occur in the other text, in the same
     order;
   - structure (`structure.py`): no relation reversed ("A to B" / "B to A", "X in a Y" / "Y in an X",
     "X of Y"), no role given to another word of the texts ("from my savings to ..." / "from my current
     account to ...", "faster than Java" / "faster than Python"), no quantified statement reordered
     ("every X is a Y"), no noun quantified on one side only ("a column" / "all columns"), the same
     operators ("==" / "==="), and no word whose letter case carries meaning written otherwise ("MBps" /
     "Mbps").
2. Content words are matched across the texts (stop words, conversational fillers and hedges dropped;
   plural, -ing/-ed forms, one-letter typos and the general synonym groups of `lexicon.py` forgiven;
   "turn on" read as "enable"). What is left unmatched is the edit:
   - a token with digits or symbols, a unit, or a language / tool / platform name: never a hit;
   - nothing left (typos, fillers, word order, contractions, synonyms): a hit when cosine >= `same_words`;
   - a word or two swapped for others: only when every swapped word is a generic verb of `lexicon.py`
     ("check" / "find", "convert" / "turn", "list" / "see"), and then when cosine >= `small_edit`.
     MiniLM cannot tell a synonym swap from a sibling swap ("adults"/"children", "tuple"/"set",
     "argparse"/"click"), and nouns and adjectives are where siblings live;
   - words only added or only removed (a narrower or wider question): never a hit;
   - a larger rewording: `reworded` (off by default).
   The thresholds are chosen on the tune halves of the evaluation pairs (`thrifty cache eval`); see the
   README for the measured rates.
Each decision carries its reason, so misses and false hits can be read off `thrifty cache eval --json`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from thrifty.gateway.cache.lexicon import (FILLER, GENERIC_VERBS, LIGHT, MONTHS, NEG_PREFIXES, NEGATIONS, NUM,
                                           OPPOSITE, STOP, TECH, UNIT_WORDS, UNITS)
from thrifty.gateway.cache.structure import (case_conflict, operator_conflict, quantifier_order, quantifier_scope,
                                             relation_conflict)
from thrifty.gateway.cache.tokens import close, contains, names, numbers, stem, synonyms, words

__all__ = ["SOFT_REFUSALS", "Decision", "Guard", "GuardConfig", "names", "numbers", "words"]


# refusals that only say the words differ, not that a fact does: an embedding may overrule them (`verify_soft`)
SOFT_REFUSALS = frozenset({"below same-words threshold", "below no-content threshold", "words only added or removed",
                           "swap beyond generic verbs", "below small edit threshold", "small edit: off",
                           "below reworded threshold", "reworded: off"})


@dataclass(slots=True)
class GuardConfig:
    same_words: float = 0.30          # cosine needed when the content words agree
    small_edit: float | None = 0.85   # cosine needed when generic verbs are swapped for others (None: never)
    reworded: float | None = None     # cosine needed for a larger rewording (None: never)
    max_swap_words: int = 2           # a swap of more words than this is a rewording
    no_content: float = 0.85          # cosine needed when neither question has a content word ("hi", "more #2"):
                                      # "same words" is then vacuous, only the embedding is left to judge
    verify_soft: float | None = None  # cosine that overrules a soft refusal (words swapped, added or removed, a
                                      # rewording); hard facts (numbers, negation, names, order...) never yield

    @property
    def floor(self) -> float:
        """The lowest cosine any branch accepts: candidates below it are not worth checking."""
        return min(t for t in (self.same_words, self.small_edit, self.reworded) if t is not None)


@dataclass(slots=True)
class Decision:
    hit: bool
    reason: str
    similarity: float
    removed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()


def _negation_count(ws: list[str]) -> int:
    return sum(w in NEGATIONS for w in ws)


def _prefix_flip(wa: set[str], wb: set[str]) -> bool:
    """A word on one side is a word of the other side with a negating prefix ("unsafe" / "safe")."""
    for x, y in ((wa, wb), (wb, wa)):
        for w in x - y:
            for p in NEG_PREFIXES:
                if w.startswith(p) and len(w) - len(p) >= 3 and w[len(p):] in y:
                    return True
    return False


def _forms(w: str) -> set[str]:
    """A word and its likely base forms ("decreased" -> "decrease", "closes" -> "close")."""
    st = stem(w)
    out = {w, st, st + "e"}
    if w.endswith(("s", "d")):
        out.add(w[:-1])
    return out


def _opposed(wa: list[str], wb: list[str]) -> str | None:
    sa = set().union(*(_forms(w) for w in wa)) if wa else set()
    sb = set().union(*(_forms(w) for w in wb)) if wb else set()
    ja, jb = " ".join(wa), " ".join(wb)
    for w in sa ^ sb:
        for opp in OPPOSITE.get(w, ()):
            mine, other = (sa, sb) if w in sa else (sb, sa)
            if " " in opp:
                if opp in (jb if mine is sa else ja) and opp not in (ja if mine is sa else jb):
                    return f"{w}/{opp}"
            elif opp in other and opp not in mine and w not in other:
                return f"{w}/{opp}"
    for phrase, opps in OPPOSITE.items():
        if " " in phrase:
            for opp in opps:
                if (phrase in ja and opp in jb and phrase not in jb) or (phrase in jb and opp in ja and phrase not in ja):
                    return f"{phrase}/{opp}"
    return None


def _content(ws: list[str]) -> list[str]:
    return [w for w in ws if w not in STOP and w not in FILLER and w not in LIGHT and w not in NEGATIONS
            and not NUM.fullmatch(w) and w not in UNITS and w not in MONTHS]  # dates: compared by `numbers`



def _unmatched(xa: list[str], xb: list[str]) -> tuple[list[str], list[str]]:
    """Content words of each side with no counterpart (exact first, then inflection / typo / synonym) on the
    other."""
    rest_b = list(xb)
    left_a: list[str] = []
    for w in xa:
        if w in rest_b:
            rest_b.remove(w)
        else:
            left_a.append(w)
    still_a = []
    for w in left_a:
        j = next((j for j, v in enumerate(rest_b) if close(w, v) or synonyms(w, v)), None)
        if j is None:
            still_a.append(w)
        else:
            rest_b.pop(j)
    return _compounds(still_a, rest_b)


def _compounds(xa: list[str], xb: list[str]) -> tuple[list[str], list[str]]:
    """A word on one side written as two on the other ("logfile" / "log file", "newlines" / "new lines");
    hyphenated compounds are split already."""
    for one, two in ((xa, xb), (xb, xa)):
        for w in list(one):
            for i in range(len(two) - 1):
                if w.isalpha() and close(w, two[i] + two[i + 1]):
                    one.remove(w)
                    del two[i:i + 2]
                    break
    return xa, xb


def _name_check(a: str, b: str) -> str | None:
    na, nb = names(a), names(b)
    wa, wb = words(a), words(b)
    for n in na:
        if not contains(wb, n):
            return f"name '{n}' only in the stored question"
    for n in nb:
        if not contains(wa, n):
            return f"name '{n}' only in the new question"
    shared = [n for n in dict.fromkeys(na) if n in set(nb)]
    if len(shared) >= 2:
        order_b = [n for n in dict.fromkeys(nb) if n in set(shared)]
        if shared != order_b:
            return "names in another order"
    return None



def _hard_words(unmatched: list[str]) -> str | None:
    """An unmatched word that no cosine may forgive: a token with digits or symbols ("512m", "c#",
    "node.js"), a unit of measure, a language, tool or platform. Siblings of one kind ("kilobyte" /
    "megabyte", "python" / "javascript", "matplotlib" / "seaborn") embed almost alike."""
    for w in unmatched:
        if not w.isalpha():
            return f"token '{w}'"
        if w in UNIT_WORDS:
            return f"unit '{w}'"
        if w in TECH:
            return f"language or tool '{w}'"
    return None


def _generic_verb(w: str) -> bool:
    return w in GENERIC_VERBS or stem(w) in GENERIC_VERBS or stem(w) + "e" in GENERIC_VERBS


def _structure(a: str, b: str, wa: list[str], wb: list[str]) -> str | None:
    """Order, roles, operators and case (see structure.py): what a bag of words cannot see."""
    for why in (operator_conflict(a, b), case_conflict(a, b), relation_conflict(wa, wb), quantifier_order(wa, wb),
                quantifier_scope(wa, wb)):
        if why is not None:
            return why
    return None


@dataclass(slots=True)
class Guard:
    """Decides whether the answer stored for `stored` may answer `query`, given their cosine."""

    config: GuardConfig = field(default_factory=GuardConfig)

    def check(self, stored: str, query: str, similarity: float) -> Decision:
        cfg = self.config
        wa, wb = words(stored), words(query)

        def no(reason: str) -> Decision:
            return Decision(False, reason, similarity)

        if numbers(stored) != numbers(query):
            return no("numbers differ")
        if _negation_count(wa) != _negation_count(wb) or _prefix_flip(set(wa), set(wb)):
            return no("negation differs")
        if (opp := _opposed(wa, wb)) is not None:
            return no(f"opposites {opp}")
        if (why := _name_check(stored, query)) is not None:
            return no(why)
        if (why := _structure(stored, query, wa, wb)) is not None:
            return no(why)
        decision = self._by_words(wa, wb, similarity)
        if not decision.hit and cfg.verify_soft is not None and similarity >= cfg.verify_soft \
                and decision.reason in SOFT_REFUSALS:
            return Decision(True, "close embedding over a soft refusal", similarity, decision.removed, decision.added)
        return decision

    def _by_words(self, wa: list[str], wb: list[str], similarity: float) -> Decision:
        """Past the hard facts: what the content words left unmatched say, and the cosine where they cannot."""
        cfg = self.config
        removed, added = _unmatched(_content(wa), _content(wb))
        r, a = tuple(removed), tuple(added)
        if (hard := _hard_words(removed + added)):
            return Decision(False, f"{hard} differs", similarity, r, a)
        if not removed and not added:
            if not _content(wa) and not _content(wb):
                ok = similarity >= cfg.no_content
                return Decision(ok, "no content words" if ok else "below no-content threshold", similarity, r, a)
            ok = similarity >= cfg.same_words
            return Decision(ok, "same content words" if ok else "below same-words threshold", similarity, r, a)
        if not removed or not added:  # a narrower or a wider question, however many words it adds
            return Decision(False, "words only added or removed", similarity, r, a)
        if len(removed) <= cfg.max_swap_words and len(added) <= cfg.max_swap_words:
            if not all(_generic_verb(w) for w in removed + added):
                return Decision(False, "swap beyond generic verbs", similarity, r, a)
            return self._by_cosine(cfg.small_edit, "small edit", similarity, r, a)
        return self._by_cosine(cfg.reworded, "reworded", similarity, r, a)

    @staticmethod
    def _by_cosine(threshold: float | None, kind: str, similarity: float, r: tuple, a: tuple) -> Decision:
        if threshold is None:
            return Decision(False, f"{kind}: off", similarity, r, a)
        ok = similarity >= threshold
        return Decision(ok, kind if ok else f"below {kind} threshold", similarity, r, a)


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.dot(u, v))
