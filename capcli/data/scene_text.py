"""Reading synthetic captions back into claims, and checking claims against a scene graph.

``describe`` writes its captions from a small grammar; ``parse`` reads every phrasing it
produces back into ``Claims``: the mentioned objects (count, optional size, colour,
shape), the relations between them, an optional total ("two shapes: ...") and an
optional background. ``holds`` checks claims against a ``Scene`` exactly, so generated
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
import re
from dataclasses import dataclass

from capcli.data.synthetic import (
    _COUNT_WORDS,  # the count words and relation phrasings describe() uses
    _RELATION_PHRASES,
    BACKGROUNDS,
    COLOURS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
    Scene,
)

_TOKEN = re.compile(r"[a-z]+|[,:]")
_LEADS = ("a picture of", "an image of", "a drawing of", "a render of")
_LINK_RELATION = {phrase: rel for rel, phrases in _RELATION_PHRASES.items() for phrase in phrases}
_COUNTS = {word: n for n, word in _COUNT_WORDS.items()} | {"a": 1, "an": 1, "a single": 1}
_NOUNS = {shape: shape for shape in SHAPES} | {plural: shape for shape, plural in SHAPE_PLURALS.items()}
_TOTAL_NOUNS = ("object", "objects", "shape", "shapes")


@dataclass(frozen=True)
class Mention:
    """``count`` objects of this colour and shape (and size, when given): "two small red circles"."""

    count: int
    colour: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class RelationClaim:
    """``mentions[subject]`` is ``relation`` ``mentions[object]``, e.g. 0 "left of" 1."""

    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class Claims:
    """Everything a caption asserts, in the order it says it."""

    mentions: tuple[Mention, ...]
    relations: tuple[RelationClaim, ...] = ()
    total: int | None = None
    background: str | None = None


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
_NOUN_WORDS = _options(*_NOUNS)
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
        self.relations: list[RelationClaim] = []
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
        self.mentions.append(Mention(_COUNTS[det], colour, _NOUNS[noun], size))
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
        self.relations.append(RelationClaim(subject, _LINK_RELATION[link], obj))
        return obj


def _prefix(r: _Reader, b: _Builder) -> None:
    """The optional opening: "there is", "a picture of", "a white background with", "two shapes:"."""
    start = r.at
    if r.take((("there",),)):
        b.pending_verb = r.at
        r.need(_VERBS)
        return
    if r.take(_options(*_LEADS)):
        return
    if r.take(_ARTICLES) and (bg := r.take(_BACKGROUND_WORDS)) and r.take((("background", "with"),)):
        b.background = bg
        return
    r.at = start
    if (count := r.take(_options(*_COUNT_WORDS.values()))) and r.take(_options(*_TOTAL_NOUNS)) and r.take(((":",),)):
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
    """Indices of the scene's objects that ``mention`` describes (ignoring its count)."""
    return [i for i, o in enumerate(scene.objects)
            if o.colour == mention.colour and o.shape == mention.shape and mention.size in (None, o.size)]


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
