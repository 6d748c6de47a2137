"""The reference captions of a synthetic scene: ``describe`` writes five true ones."""

from __future__ import annotations

import random

from capcli.scenes.graph import Scene, SceneObject
from capcli.scenes.vocabulary import (
    COUNT_WORDS,
    LEADS,
    RELATION_PHRASES,
    SHAPE_PLURALS,
    article,
)

_MAX_WORDS = 20

def _phrase(count: int, obj: SceneObject, sized: bool) -> str:
    """"a small red circle", "an orange star", "two red circles"."""
    words = ([obj.size] if sized else []) + [obj.colour]
    words.append(obj.shape if count == 1 else SHAPE_PLURALS[obj.shape])
    head = article(words[0]) if count == 1 else COUNT_WORDS[count]
    return " ".join([head, *words])


def _groups(scene: Scene, sized: bool) -> list[list[int]]:
    """Indices of objects a phrase cannot tell apart, so they are counted together."""
    groups: dict[tuple[str | None, str, str], list[int]] = {}
    for i, o in enumerate(scene.objects):
        groups.setdefault((o.size if sized else None, o.colour, o.shape), []).append(i)
    return list(groups.values())


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _relation_caption(scene: Scene, rng: random.Random, sized: bool) -> str | None:
    """A caption built on recorded relations, or None if no group pair has one."""
    groups = _groups(scene, sized)
    known = {(r.subject, r.object): r.relation for r in scene.relations}

    def between(a: list[int], b: list[int]) -> str | None:
        # A group relation is only true if it holds for every member pair.
        found = {known.get((i, j)) for i in a for j in b}
        return next(iter(found)) if len(found) == 1 else None

    pairs = [(a, b, rel) for a in range(len(groups)) for b in range(len(groups))
             if a != b and (rel := between(groups[a], groups[b]))]
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)

    def noun(g: int) -> str:
        return _phrase(len(groups[g]), scene.objects[groups[g][0]], sized)

    def verb(g: int) -> str:
        return "is" if len(groups[g]) == 1 else "are"

    link = rng.choice(RELATION_PHRASES[rel])
    text = f"{noun(a)} {verb(a) + ' ' if rng.random() < 0.5 else ''}{link} {noun(b)}"
    rest = [g for g in range(len(groups)) if g not in (a, b)]
    if rest:
        c = rest[0]
        chained = between(groups[b], groups[c])
        if chained:
            text += f", which {verb(b)} {rng.choice(RELATION_PHRASES[chained])} {noun(c)}"
        else:
            text += f", and {noun(c)}"
    return text


def _family_caption(family: str, scene: Scene, rng: random.Random, sized: bool) -> str | None:
    """One caption of the named phrasing family; every object is always mentioned."""
    if family == "relation":
        return _relation_caption(scene, rng, sized)
    groups = _groups(scene, sized)
    phrases = [_phrase(len(g), scene.objects[g[0]], sized) for g in groups]
    listing = _join(phrases)
    bg = scene.background
    if family == "plain":
        return listing
    if family == "there":
        return f"there {'is' if len(groups[0]) == 1 else 'are'} {listing}"
    if family == "picture":
        lead = rng.choice(LEADS)
        return f"{lead} {listing}"
    if family == "background":
        if rng.random() < 0.5:
            return f"{listing} on {article(bg)} {bg} background"
        return f"{article(bg)} {bg} background with {listing}"
    # family == "count"
    n = len(scene.objects)
    if n == 1:
        bare = listing.split(" ", 1)[1]  # drop the article
        return rng.choice((f"a single {bare}", f"one {rng.choice(('object', 'shape'))}: {listing}"))
    return f"{COUNT_WORDS[n]} {rng.choice(('objects', 'shapes'))}: {listing}"


def describe(scene: Scene, rng: random.Random) -> list[str]:
    """Returns 5 distinct true captions for ``scene`` (fewer only if impossible).

    Captions are lowercase with no final period, mention every object's colour
    and shape (identical objects via a count, "two red circles"), and mention
    size and background only in some phrasings. If the scene has a usable
    relation, one caption is relational.
    """
    others = ["plain", "there", "picture", "background", "count"]
    rng.shuffle(others)
    families = ["relation", *others]
    captions: list[str] = []
    for attempt in range(40):
        # After one pass over the families, keep trying random ones for variety.
        family = families[attempt] if attempt < len(families) else rng.choice(families)
        text = None
        for sized in (rng.random() < 0.5, False):  # too long with sizes -> retry without
            text = _family_caption(family, scene, rng, sized)
            if text is None or len(text.split()) <= _MAX_WORDS:
                break
        if text and len(text.split()) <= _MAX_WORDS and text not in captions:
            captions.append(text)
        if len(captions) == 5:
            break
    return captions
