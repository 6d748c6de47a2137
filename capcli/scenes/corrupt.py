"""One-fact corruptions of captions: the rejected side of generated preference pairs.

``scene_negatives`` edits a caption in ``describe``'s grammar against its scene graph and
keeps only edits that make it false, so every rejected caption is provably wrong:

- ``object``: a shape becomes one that no object of that colour has;
- ``colour``: a colour becomes one that no object of that shape has;
- ``size``: a size flips, or one is added, so that no object of that kind has it;
- ``count``: a mention's count, or the stated total, changes;
- ``relation``: a relation phrase becomes its opposite ("left of" -> "right of");
- ``swap``: two objects exchange their colours, and neither new pair exists (a binding error).

``text_negatives`` does the same kinds of edits on free text with a small word lexicon; it
cannot check them, so they are only very likely false. Articles ("a"/"an"), noun number
and "is"/"are" are kept grammatical, so a rejected caption differs from the chosen one in
its meaning, never in its fluency.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace

from capcli.scenes.graph import Relation, Scene
from capcli.scenes.reader import (
    Layout,
    Mention,
    MentionSpan,
    holds,
    parse_layout,
)
from capcli.scenes.vocabulary import (
    COLOURS,
    COUNT_WORDS,
    RELATION_PHRASES,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
    article,
)

CORRUPTIONS = ("object", "colour", "size", "count", "relation", "swap", "other_image")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Phrase by phrase, so the wording stays parallel: "to the left of" -> "to the right of".
_FLIP = {
    phrase: RELATION_PHRASES[_OPPOSITE[rel]][min(k, len(RELATION_PHRASES[_OPPOSITE[rel]]) - 1)]
    for rel, phrases in RELATION_PHRASES.items()
    for k, phrase in enumerate(phrases)
}

Edit = tuple[int, int, str]  # replace tokens [start, end) with this text


def _apply(caption: str, layout: Layout, edits: list[Edit]) -> str:
    """Replaces token ranges in ``caption``, keeping everything between them byte for byte."""
    for start, end, text in sorted(edits, reverse=True):
        a, b = layout.tokens[start][1], layout.tokens[end - 1][2]
        if caption[a:b][:1].isupper():
            text = text[:1].upper() + text[1:]
        caption = caption[:a] + text + caption[b:]
    return caption


def _retell(layout: Layout, span: MentionSpan, old: Mention, new: Mention) -> list[Edit]:
    """The edits that turn mention ``old`` into ``new``, with its article, noun and verb agreeing."""
    words = [t[0] for t in layout.tokens]
    edits: list[Edit] = []
    det = " ".join(words[span.det[0]:span.det[1]])
    if new.count > 1:
        new_det = COUNT_WORDS[new.count]
    elif det in ("a", "an") or old.count > 1:
        new_det = article(new.size or new.colour)
    else:
        new_det = det  # "one", "a single"
    if new_det != det:
        edits.append((*span.det, new_det))
    if new.size is None and old.size is not None:
        raise ValueError("a corruption never removes a size")
    if new.size != old.size and span.size is None:  # add one: "red circle" -> "large red circle"
        edits.append((span.colour, span.colour + 1, f"{new.size} {new.colour}"))
    else:
        if new.size != old.size:
            edits.append((span.size, span.size + 1, new.size))
        if new.colour != old.colour:
            edits.append((span.colour, span.colour + 1, new.colour))
    noun = new.shape if new.count == 1 else SHAPE_PLURALS[new.shape]
    if noun != words[span.shape]:
        edits.append((span.shape, span.shape + 1, noun))
    if span.verb is not None and (new.count > 1) != (old.count > 1):
        edits.append((span.verb, span.verb + 1, "are" if new.count > 1 else "is"))
    return edits


def scene_negatives(caption: str, scene: Scene, kinds: Iterable[str] = CORRUPTIONS,
                    known: frozenset[tuple[str, str]] | None = None) -> dict[str, list[str]]:
    """Every corruption of ``caption`` of the given kinds that is false for ``scene``; {} if it does not parse.

    ``known``: the colour-shape pairs a corruption may name (None: any). Training pairs name
    only the pairs that the training scenes show: a rejected "yellow circle", where no yellow
    circle is ever drawn, would teach that the pair itself is wrong, which nothing in the
    images says, and the model would refuse it where one is (test_novel).
    """
    parsed = parse_layout(caption)
    if parsed is None:
        return {}
    claims, layout = parsed
    kinds = set(kinds)
    found: dict[str, list[str]] = defaultdict(list)
    pairs = {(o.colour, o.shape) for o in scene.objects}  # "absent in that colour" ignores size
    triples = {(o.size, o.colour, o.shape) for o in scene.objects}

    def nameable(*named: tuple[str, str]) -> bool:
        return known is None or all(pair in known for pair in named)

    def offer(kind: str, changed: dict[int, Mention], edits: list[Edit] | None = None, **fields) -> None:
        mentions = tuple(changed.get(i, m) for i, m in enumerate(claims.mentions))
        if holds(replace(claims, mentions=mentions, **fields), scene):
            return
        edits = list(edits or [])
        for i, m in changed.items():
            edits += _retell(layout, layout.mentions[i], claims.mentions[i], m)
        found[kind].append(_apply(caption, layout, edits))

    for i, m in enumerate(claims.mentions):
        if "object" in kinds:
            for shape in SHAPES:
                if shape != m.shape and (m.colour, shape) not in pairs and nameable((m.colour, shape)):
                    offer("object", {i: Mention(m.count, m.colour, shape, m.size)})
        if "colour" in kinds:
            for colour in COLOURS:
                if colour != m.colour and (colour, m.shape) not in pairs and nameable((colour, m.shape)):
                    offer("colour", {i: Mention(m.count, colour, m.shape, m.size)})
        if "size" in kinds:
            for size in SIZES:
                if size != m.size and (size, m.colour, m.shape) not in triples:
                    offer("size", {i: Mention(m.count, m.colour, m.shape, size)})
        if "count" in kinds:
            for count in COUNT_WORDS:
                if count != m.count:
                    offer("count", {i: Mention(count, m.colour, m.shape, m.size)})
    if "count" in kinds and claims.total is not None and layout.total is not None:
        at, noun_at = layout.total
        noun = layout.tokens[noun_at][0].removesuffix("s")
        for total in COUNT_WORDS:
            if total != claims.total:
                edits = [(at, at + 1, COUNT_WORDS[total]), (noun_at, noun_at + 1, noun + ("s" if total > 1 else ""))]
                offer("count", {}, edits, total=total)
    if "relation" in kinds:
        for k, (rel, (start, end)) in enumerate(zip(claims.relations, layout.links)):
            phrase = " ".join(t[0] for t in layout.tokens[start:end])
            relations = list(claims.relations)
            relations[k] = Relation(rel.subject, _OPPOSITE[rel.relation], rel.object)
            offer("relation", {}, [(start, end, _FLIP[phrase])], relations=tuple(relations))
    if "swap" in kinds:
        for i, a in enumerate(claims.mentions):
            for j, b in enumerate(claims.mentions[i + 1:], start=i + 1):
                if (a.colour != b.colour and a.shape != b.shape
                        and (b.colour, a.shape) not in pairs and (a.colour, b.shape) not in pairs
                        and nameable((b.colour, a.shape), (a.colour, b.shape))):
                    offer("swap", {i: Mention(a.count, b.colour, a.shape, a.size),
                                   j: Mention(b.count, a.colour, b.shape, b.size)})
    return dict(found)


# --- free text ----------------------------------------------------------------

_TEXT_COLOURS = (*COLOURS, "black", "white", "brown", "gray", "grey")
_COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")  # all take a plural
_OBJECTS = {  # singular -> plural; swaps keep the number
    "man": "men", "woman": "women", "boy": "boys", "girl": "girls", "child": "children", "dog": "dogs",
    "cat": "cats", "horse": "horses", "cow": "cows", "bird": "birds", "elephant": "elephants",
    "giraffe": "giraffes", "zebra": "zebras", "bear": "bears", "car": "cars", "bus": "buses",
    "truck": "trucks", "train": "trains", "bicycle": "bicycles", "motorcycle": "motorcycles",
    "boat": "boats", "airplane": "airplanes", "table": "tables", "chair": "chairs", "bed": "beds",
    "bench": "benches", "ball": "balls", "kite": "kites", "umbrella": "umbrellas", "pizza": "pizzas",
    "cake": "cakes", "sandwich": "sandwiches", "cup": "cups", "bottle": "bottles", "laptop": "laptops",
    "clock": "clocks", "tree": "trees", "house": "houses", "building": "buildings",
    **SHAPE_PLURALS,
}
_ANTONYMS = {
    "size": {"small": ("large", "big"), "large": ("small",), "big": ("small", "little"), "little": ("big", "large"),
             "tiny": ("huge", "large"), "huge": ("tiny", "small"), "tall": ("short",), "short": ("tall",)},
    "relation": {"left": ("right",), "right": ("left",), "above": ("below",), "below": ("above",),
                 "over": ("under",), "under": ("over",), "beneath": ("above",), "top": ("bottom",),
                 "bottom": ("top",), "inside": ("outside",), "outside": ("inside",),
                 "in front of": ("behind",), "behind": ("in front of",)},
}
_SYNONYMS = ({"gray", "grey"},)


def _alternatives(kind: str, word: str) -> list[str]:
    if kind == "colour":
        same = next((s for s in _SYNONYMS if word in s), {word})
        return [c for c in _TEXT_COLOURS if c not in same]
    if kind == "count":
        return [c for c in _COUNTS if c != word]
    if kind == "object":
        plural = word in _OBJECTS.values()
        pool = _OBJECTS.values() if plural else _OBJECTS
        return [o for o in pool if o != word]
    return list(_ANTONYMS[kind][word])


_LEXICON = (
    {w: "colour" for w in _TEXT_COLOURS}
    | {w: "count" for w in _COUNTS}
    | {w: "object" for pair in _OBJECTS.items() for w in pair}
    | {w: kind for kind, table in _ANTONYMS.items() for w in table}
)
_LEXICON_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _LEXICON), key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)
_NEXT_WORD = re.compile(r"\W*(\w+)")
_ARTICLE_BEFORE = re.compile(r"\b(an?)(\s+)$", re.IGNORECASE)


def _replace_word(text: str, start: int, end: int, new: str) -> str:
    """``text`` with [start, end) replaced by ``new``, matching case and the article before it."""
    if text[start].isupper():
        new = new[:1].upper() + new[1:]
    head = text[:start]
    before = _ARTICLE_BEFORE.search(head)
    if before:
        fixed = article(new.lower())
        fixed = fixed.capitalize() if before.group(1)[0].isupper() else fixed
        head = head[:before.start(1)] + fixed + before.group(2)
    return head + new + text[end:]


def _next_word(text: str, at: int) -> str:
    found = _NEXT_WORD.match(text, at)
    return found.group(1).lower() if found else ""


def text_negatives(caption: str) -> dict[str, list[str]]:
    """Lexicon edits of free text by kind (colour, count, object, size, relation, swap)."""
    found: dict[str, list[str]] = defaultdict(list)
    colours = []
    for m in _LEXICON_RE.finditer(caption):
        word = m.group().lower()
        kind = _LEXICON[word]
        for new in _alternatives(kind, word):
            found[kind].append(_replace_word(caption, m.start(), m.end(), new))
        if kind == "colour":
            colours.append(m)
    # Binding swap: two different colours of two different things trade places
    # ("a red car and a blue bus" -> "a blue car and a red bus").
    for a, b in itertools.pairwise(colours):
        if a.group().lower() != b.group().lower() and _next_word(caption, a.end()) != _next_word(caption, b.end()):
            text = _replace_word(caption, b.start(), b.end(), a.group().lower())
            found["swap"].append(_replace_word(text, a.start(), a.end(), b.group().lower()))
            break
    return {kind: [t for t in texts if t != caption] for kind, texts in found.items() if texts}
