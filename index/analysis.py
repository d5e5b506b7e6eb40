"""Text analysis shared by the lexical indexes, learned term weights and quality estimators: words,
English stop words and Snowball stems, so that every part of Sieve counts the same terms."""
from __future__ import annotations

import re

import Stemmer
from bm25s.stopwords import STOPWORDS_EN

_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # bm25s's default token pattern
_STOPWORDS = frozenset(STOPWORDS_EN)
_stemmer = Stemmer.Stemmer("english")


def words(text: str) -> list[str]:
    """Lower-case words of two or more characters, stop words kept."""
    return _TOKEN.findall(text.lower())


def analyze(text: str) -> list[str]:
    """Lower-case words of two or more characters, English stop words removed, Snowball-stemmed."""
    return _stemmer.stemWords([t for t in words(text) if t not in _STOPWORDS])


def words_and_terms(text: str) -> tuple[list[str], list[str | None]]:
    """The analyser's words (stop words kept for context) and each word's indexed term, or None."""
    all_words = words(text)
    stems = _stemmer.stemWords(all_words)
    return all_words, [None if w in _STOPWORDS else s for w, s in zip(all_words, stems)]
