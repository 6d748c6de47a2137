"""Reading synthetic captions back into claims, and checking claims against a scene graph.

``describe`` writes its captions from a small grammar; ``parse`` reads every phrasing it
produces back into ``Claims``: the mentioned objects (count, optional size, colour,
shape), the relations between them, an optional total ("two shapes: ...") and an
optional background. ``read_caption`` reads any caption: by ``parse`` where it is in the
grammar, word by word where it is not (``Claims.parsed`` is then False). ``holds`` checks claims against a ``Scene`` exactly, so generated
preference pairs can prove their rejected caption false, and grounding metrics can score
generated captions. Text outside the grammar parses to None.

Semantics (the same ones ``describe`` writes by):

- A mention "two small red circles" is true when exactly that many objects match it; a
  mention without a size matches objects of either size.
- A relation "A is left of B" is true when it is recorded in the scene graph for every
  pair of an object matching A and an object matching B.
- A total ("three objects: ...") is true when the scene has that many objects.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

from capcli.scenes.graph import Relation, Scene
from capcli.scenes.vocabulary import (
    BACKGROUNDS,
    COLOURS,
    COUNT_WORDS,
    LEADS,
    RELATION_PHRASES,
    SHAPE_OF_NOUN,
    SIZES,
    TOTAL_NOUNS,
)

_TOKEN = re.compile(r"[a-z]+|[,:]")
_LINK_RELATION = {phrase: rel for rel, phrases in RELATION_PHRASES.items() for phrase in phrases}
_TOTAL_COUNTS = {word: n for n, word in COUNT_WORDS.items()}  # "two shapes: ..."
_COUNTS = _TOTAL_COUNTS | {"a": 1, "an": 1, "a single": 1}  # a mention's determiner, in the grammar


@dataclass(frozen=True)
class Mention:
    """``count`` objects of this colour and shape (and size, when given): "two small red circles".

    In ``describe``'s grammar every mention has a count and a colour; a caption read word by
    word (``read_caption``) may leave them out, and they are None.
    """

    count: int | None
    colour: str | None
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class Claims:
    """Everything a caption asserts, in the order it says it."""

    mentions: tuple[Mention, ...]
    relations: tuple[Relation, ...] = ()  # over the mentions: mentions[subject] is ... mentions[object]
    total: int | None = None
    background: str | None = None
    parsed: bool = True  # False: outside describe()'s grammar, read word by word (or not at all)


@dataclass(frozen=True)
class MentionSpan:
    """Token positions of one mention; ``verb`` is the "is"/"are" that agrees with it, if any."""

    det: tuple[int, int]
    size: int | None
    colour: int
    shape: int
    verb: int | None = None


@dataclass(frozen=True)
class Layout:
    """Where each claim sits in the caption, so that an editor can change exactly one.

    ``tokens`` are ``(word, start, end)`` with character offsets into the caption;
    ``links`` the token range of each relation phrase; ``total`` the positions of the
    count word and noun of a total ("two" and "shapes").
    """

    tokens: tuple[tuple[str, int, int], ...]
    mentions: tuple[MentionSpan, ...]
    links: tuple[tuple[int, int], ...]
    total: tuple[int, int] | None


class _NoParse(Exception):
    pass


def _options(*phrases: str) -> tuple[tuple[str, ...], ...]:
    """Phrases as word tuples, longest first, so "a single" wins over "a"."""
    return tuple(sorted((tuple(p.split()) for p in phrases), key=len, reverse=True))


_DETS = _options(*_COUNTS)
_SIZE_WORDS = _options(*SIZES)
_COLOUR_WORDS = _options(*COLOURS)
_NOUN_WORDS = _options(*SHAPE_OF_NOUN)
_LINKS = _options(*_LINK_RELATION)
_VERBS = _options("is", "are")
_ARTICLES = _options("a", "an")
_BACKGROUND_WORDS = _options(*BACKGROUNDS)


class _Reader:
    """A cursor over a caption's words; ``take`` consumes a phrase, ``need`` insists on one."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.at = 0

    def take(self, options: tuple[tuple[str, ...], ...]) -> str | None:
        for parts in options:
            if tuple(self.words[self.at:self.at + len(parts)]) == parts:
                self.at += len(parts)
                return " ".join(parts)
        return None

    def sees(self, options: tuple[tuple[str, ...], ...]) -> bool:
        start = self.at
        found = self.take(options)
        self.at = start
        return found is not None

    def need(self, options: tuple[tuple[str, ...], ...]) -> str:
        found = self.take(options)
        if found is None:
            raise _NoParse
        return found


class _Builder:
    """Collects claims and their token positions while the reader walks the caption."""

    def __init__(self) -> None:
        self.mentions: list[Mention] = []
        self.spans: list[MentionSpan] = []
        self.relations: list[Relation] = []
        self.links: list[tuple[int, int]] = []
        self.total: int | None = None
        self.total_at: tuple[int, int] | None = None
        self.background: str | None = None
        self.pending_verb: int | None = None  # "there is" agrees with the mention that follows

    def mention(self, r: _Reader) -> int:
        start = r.at
        det = r.need(_DETS)
        det_end = r.at
        size_at = r.at
        size = r.take(_SIZE_WORDS)
        size_at = size_at if size is not None else None
        colour_at = r.at
        colour = r.need(_COLOUR_WORDS)
        shape_at = r.at
        noun = r.need(_NOUN_WORDS)
        self.mentions.append(Mention(_COUNTS[det], colour, SHAPE_OF_NOUN[noun], size))
        self.spans.append(MentionSpan((start, det_end), size_at, colour_at, shape_at, self.pending_verb))
        self.pending_verb = None
        return len(self.mentions) - 1

    def set_verb(self, index: int, at: int) -> None:
        span = self.spans[index]
        self.spans[index] = MentionSpan(span.det, span.size, span.colour, span.shape, at)

    def relation(self, r: _Reader, subject: int) -> int:
        """Reads "LINK NP" after ``subject`` and records the relation; returns the object."""
        start = r.at
        link = r.need(_LINKS)
        self.links.append((start, r.at))
        obj = self.mention(r)
        self.relations.append(Relation(subject, _LINK_RELATION[link], obj))
        return obj


def _prefix(r: _Reader, b: _Builder) -> None:
    """The optional opening: "there is", "a picture of", "a white background with", "two shapes:"."""
    start = r.at
    if r.take((("there",),)):
        b.pending_verb = r.at
        r.need(_VERBS)
        return
    if r.take(_options(*LEADS)):
        return
    if r.take(_ARTICLES) and (bg := r.take(_BACKGROUND_WORDS)) and r.take((("background", "with"),)):
        b.background = bg
        return
    r.at = start
    if (count := r.take(_options(*COUNT_WORDS.values()))) and r.take(_options(*TOTAL_NOUNS)) and r.take(((":",),)):
        b.total, b.total_at = _COUNTS[count], (start, start + 1)
        return
    r.at = start


def _body(r: _Reader, b: _Builder) -> None:
    """A relation ("A [is] LINK B[, which is LINK C | , and C]") or a listing ("A, B and C")."""
    first = b.mention(r)
    before = r.at
    verb_at = before if r.take(_VERBS) else None
    if r.sees(_LINKS):
        if verb_at is not None:
            b.set_verb(first, verb_at)
        second = b.relation(r, first)
        if r.take(((",",),)):
            if r.take((("which",),)):
                b.set_verb(second, r.at)
                r.need(_VERBS)
                b.relation(r, second)
            else:
                r.need((("and",),))
                b.mention(r)
        return
    r.at = before
    while True:
        if r.take(((",",),)):
            r.take((("and",),))
        elif not r.take((("and",),)):
            return
        b.mention(r)


@functools.lru_cache(maxsize=1 << 16)  # synthetic captions repeat a lot across scenes
def parse_layout(caption: str) -> tuple[Claims, Layout] | None:
    """Parses ``caption`` into its claims and where they sit; None if it is outside the grammar.

    Case, surrounding spaces and one final period are ignored.
    """
    text = caption.lower().rstrip()
    text = text.removesuffix(".")
    if _TOKEN.sub(" ", text).strip():  # a character the grammar has no place for
        return None
    tokens = tuple((m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text))
    r, b = _Reader([t[0] for t in tokens]), _Builder()
    try:
        _prefix(r, b)
        _body(r, b)
        if r.take((("on",),)):
            r.need(_ARTICLES)
            b.background = r.need(_BACKGROUND_WORDS)
            r.need((("background",),))
    except _NoParse:
        return None
    if r.at != len(tokens):
        return None
    claims = Claims(tuple(b.mentions), tuple(b.relations), b.total, b.background)
    return claims, Layout(tokens, tuple(b.spans), tuple(b.links), b.total_at)


def parse(caption: str) -> Claims | None:
    """The claims of a caption in ``describe``'s grammar, or None if it is outside it."""
    parsed = parse_layout(caption)
    return parsed[0] if parsed else None


def matches(scene: Scene, mention: Mention) -> list[int]:
    """Indices of the scene's objects that ``mention`` describes (ignoring its count).

    A colour or size the mention leaves out (None) matches any.
    """
    return [i for i, o in enumerate(scene.objects) if o.shape == mention.shape
            and mention.colour in (None, o.colour) and mention.size in (None, o.size)]


def relation_holds(scene: Scene, subjects: list[int], relation: str, objects: list[int]) -> bool:
    """True when every subject object is ``relation`` every object object in the scene graph."""
    known = {(r.subject, r.object): r.relation for r in scene.relations}
    return bool(subjects and objects) and all(known.get((i, j)) == relation for i in subjects for j in objects)


def holds(claims: Claims, scene: Scene) -> bool:
    """True when every claim is true of ``scene``."""
    groups = [matches(scene, m) for m in claims.mentions]
    if any(len(group) != m.count for group, m in zip(groups, claims.mentions)):
        return False
    if not all(relation_holds(scene, groups[r.subject], r.relation, groups[r.object]) for r in claims.relations):
        return False
    if claims.total is not None and claims.total != len(scene.objects):
        return False
    return claims.background is None or claims.background == scene.background


def is_true(caption: str, scene: Scene) -> bool:
    """True when ``caption`` parses and all it claims is true of ``scene``; unparseable text is not."""
    claims = parse(caption)
    return claims is not None and holds(claims, scene)


# --- captions outside the grammar -------------------------------------------------------
# Generated captions may be cut short or stutter ("a red circle circle", "a red circle and
# a"). ``parse`` rejects them; ``read_caption`` then reads them word by word, as CHAIR reads
# free text: every shape word is a mention, with the colour, size and count words directly
# before it, and a relation phrase directly between two mentions is a relation.

_WORD = re.compile(r"[a-z]+")
_DET_COUNTS = _TOTAL_COUNTS | {"a": 1, "an": 1, "single": 1}  # word by word, "a single" is two words
_WORD_LINKS = {tuple(phrase.split()): rel for phrase, rel in _LINK_RELATION.items()}
_BACKGROUND_PHRASES = sorted((tuple(bg.split()) for bg in BACKGROUNDS), key=len, reverse=True)


def _read_words(caption: str) -> Claims:
    """The word-by-word reading of a caption outside the grammar (see above)."""
    words = _WORD.findall(caption.lower())
    mentions: list[Mention] = []
    spans: list[tuple[int, int]] = []
    free = 0  # the first word not yet taken by a mention
    for j, word in enumerate(words):
        if word not in SHAPE_OF_NOUN:
            continue
        k, colour, size, count = j, None, None, None
        if k > free and words[k - 1] in COLOURS:
            k -= 1
            colour = words[k]
        if k > free and words[k - 1] in SIZES:
            k -= 1
            size = words[k]
        if k > free and words[k - 1] in _DET_COUNTS:
            k -= 1
            count = _DET_COUNTS[words[k]]
            if words[k] == "single" and k > free and words[k - 1] == "a":
                k -= 1
        mentions.append(Mention(count, colour, SHAPE_OF_NOUN[word], size))
        spans.append((k, j + 1))
        free = j + 1
    relations = []
    for a in range(len(spans) - 1):
        between = words[spans[a][1]:spans[a + 1][0]]
        if between[:1] == ["which"]:
            between = between[1:]
        if between[:1] in (["is"], ["are"]):
            between = between[1:]
        if tuple(between) in _WORD_LINKS:
            relations.append(Relation(a, _WORD_LINKS[tuple(between)], a + 1))
    total = next((_TOTAL_COUNTS[w] for w, nxt in itertools.pairwise(words)
                  if w in _TOTAL_COUNTS and nxt in TOTAL_NOUNS), None)
    background = None
    for j, word in enumerate(words):
        if word == "background":
            background = next((" ".join(bg) for bg in _BACKGROUND_PHRASES
                               if j >= len(bg) and tuple(words[j - len(bg):j]) == bg), None)
            break
    return Claims(tuple(mentions), tuple(relations), total, background, parsed=False)


def read_caption(caption: str, lenient: bool = True) -> Claims:
    """Reads what ``caption`` says about objects; never raises on a string.

    Args:
        caption: a generated caption, in ``describe``'s grammar or not.
        lenient: read a caption outside the grammar word by word; if False, such a caption
            reads as saying nothing.

    Returns:
        Claims. ``parsed`` is False for a caption outside the grammar.
    """
    claims = parse(caption)
    if claims is None:
        return _read_words(caption) if lenient else Claims((), parsed=False)
    return claims
