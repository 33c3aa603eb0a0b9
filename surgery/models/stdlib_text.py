"""Natural English text that ships with Python: the standard library's documentation topics
(``pydoc_data.topics``), as whole topics or as fixed-length passages, optionally split into two
halves of the topics that share no text (attribute on one half, judge on the other), or as
(first sentence, rest of the paragraph) pairs of its prose paragraphs."""
from __future__ import annotations

import re

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def stdlib_topics(part: str = "all") -> list[tuple[str, str]]:
    """``(name, text)`` of the documentation topics in sorted order: all, the even (``a``) or odd (``b``) ones.
    In a half, a topic whose text repeats an earlier one's (``if`` and ``else``) is left out."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if part != "all":
        seen: set[str] = set()
        keys = [key for key in keys if not (topics[key] in seen or seen.add(topics[key]))]
        keys = keys[0 if part == "a" else 1::2]
    return [(key, topics[key]) for key in keys]


def stdlib_passages(words_per_passage: int, part: str = "all") -> list[str]:
    """Passages of ``words_per_passage`` words from each documentation topic, in topic order.

    A topic's last, shorter passage is kept when it has at least half the words. Part ``b`` leaves
    out the few passages that also occur word for word in part ``a`` (topics share some paragraphs).
    """
    passages = []
    for _, text in stdlib_topics(part):
        words = text.split()
        for start in range(0, len(words), words_per_passage):
            chunk = words[start:start + words_per_passage]
            if len(chunk) * 2 >= words_per_passage:
                passages.append(" ".join(chunk))
    if part == "b":
        other = set(stdlib_passages(words_per_passage, "a"))
        passages = [p for p in passages if p not in other]
    return passages


def paragraph_pairs(part: str, min_words: int = 30) -> list[tuple[str, str]]:
    """``(first sentence, rest of the paragraph)`` for prose paragraphs of the chosen topics."""
    others = " ".join(" ".join(text.split()) for _, text in stdlib_topics("a" if part == "b" else "b")) if part != "all" else ""
    pairs = []
    for _, text in stdlib_topics(part):
        for block in re.split(r"\n\s*\n", text):
            if block.startswith((" ", "\t")) or "::=" in block or block.strip().startswith((">>>", "*", "=")):
                continue  # grammar, code and headings
            paragraph = " ".join(block.split())
            sentences = SENTENCE_END.split(paragraph, maxsplit=1)
            if paragraph in others:  # the other half has it too (topics share some paragraphs)
                continue
            if len(paragraph.split()) >= min_words and len(sentences) == 2 and len(sentences[0].split()) >= 4:
                pairs.append((sentences[0], sentences[1]))
    return pairs
