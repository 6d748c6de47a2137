"""Concept words: which of a short list of words (the objects a source names) each image shows.

These are the targets of the concept head (``losses.concept_loss``): weak labels read from the
captions themselves, as in Fang et al. 2015 ("From captions to visual concepts and back").
A concept is a word or a phrase of words ("cross", "red cross"). It counts where the caption
has it as whole words, its last word in the singular or a plural ("crosses", "red crosses").

Where an image has a scene graph (``synthetic``), the phrases the graph makes true count too
(``scene_concepts``: each object's shape, colour and size and their combinations, and the
relations between shapes). A caption leaves facts out: "a small red circle" names no "small
circle", half of the captions name no size, and only one in five states a relation; read
from the caption alone, such a concept would be marked absent where it is in the picture.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

_WORD = re.compile(r"[a-z]+")
_CONVERSE = {"right of": "left of", "below": "above"}


def scene_concepts(scene: dict[str, Any]) -> set[str]:
    """The concept phrases that a scene graph (``Scene.to_dict()``) makes true, in canonical form.

    For each object: its shape, colour and size alone and in order ("small", "small red",
    "red circle", "small circle", "small red circle"). For each relation between two objects:
    "SHAPE left of SHAPE" or "SHAPE above SHAPE" (``canonical`` names "right of" and "below"
    the other way round).
    """
    objects = scene["objects"]
    said: set[str] = set()
    for o in objects:
        size, colour, shape = o["size"], o["colour"], o["shape"]
        said |= {shape, colour, size, f"{colour} {shape}", f"{size} {shape}", f"{size} {colour}",
                 f"{size} {colour} {shape}"}
    for r in scene["relations"]:
        said.add(canonical(f"{objects[r['subject']]['shape']} {r['relation']} {objects[r['object']]['shape']}"))
    return said


def canonical(phrase: str) -> str:
    """A relation phrase named one way round: "square right of circle" → "circle left of square",
    "star below square" → "square above star". Any other phrase is returned as it is."""
    for relation, converse in _CONVERSE.items():
        subject, found, obj = phrase.partition(f" {relation} ")
        if found and subject and obj:
            return f"{obj} {converse} {subject}"
    return phrase


# Words that name nothing in a picture: articles, prepositions, pronouns, auxiliaries, numbers.
_FUNCTION_WORDS = frozenset("""
a an the this that these those there here it its is are was were be been being has have had do does did
of on in at to from by with without for into onto over under above below near next beside behind between
and or but not no as than then so very some any each every all both other another one two three four five
six seven eight nine ten his her their our your my he she they we you i who which what where while
""".split())


def caption_words(captions: Iterable[Sequence[str]], limit: int = 64, min_share: float = 0.01) -> tuple[str, ...]:
    """Concept words read from a source's own captions: its most common content words.

    The words (not function words) that at least ``min_share`` of the images' captions use, most
    common first, at most ``limit``; a plural whose singular is also used counts as that
    singular ("apples" is "apple"). For a source whose captions name what is in the picture
    ("a red apple"), these are its objects and attributes, the labels the concept head needs
    to learn them from scratch (docs/models.md).

    Args:
        captions: the reference captions of each training image.
    """
    images: Counter[str] = Counter()
    n = 0
    for refs in captions:
        n += 1
        images.update({w for caption in refs for w in _WORD.findall(caption.lower())} - _FUNCTION_WORDS)
    merged: Counter[str] = Counter()
    for word, count in images.items():
        stem = next((word[: -len(end)] for end in ("es", "s") if word.endswith(end) and word[: -len(end)] in images),
                    word)
        merged[stem] += count
    ranked = [w for w, count in sorted(merged.items(), key=lambda item: (-item[1], item[0]))
              if len(w) > 1 and count >= min_share * n]
    return tuple(ranked[:limit])


def plurals(word: str) -> tuple[str, str]:
    """The plural forms a concept word is also read in ("circles", "crosses")."""
    return word + "s", word + "es"


def concept_slots(captions: Iterable[str], concepts: Sequence[str]) -> list[int]:
    """Each concept's slot in the captions' phrases: how many concept words follow it in a run of
    several concept words, in its most common use ("a small red circle": small 2, red 1, circle 0).

    Concept-guided decoding (``guidance.ConceptGuidance``) lets the decoder say *when* a word
    of a slot comes, and the concept head *which* one: the slots group the words that can stand
    in for one another (shapes, colours, sizes; objects and their attributes) without a list
    made by hand. Only a word that stands in such a run in at least half of its uses gets a slot:
    one mostly said alone ("a drawing of ...", "a man sitting on ...") is not placed by the words
    around it, and keeps the additive guidance. A concept of several words, or one the captions
    never use, has slot -1 too.

    Args:
        captions: training captions (the first ones are enough: the slots are the commonest use).
        concepts: the concept words, as the model's ``concept_words``.
    """
    index: dict[str, int] = {}
    for c, concept in enumerate(concepts):
        if len(_WORD.findall(concept.lower())) == 1:
            index.setdefault(concept.lower(), c)
    for concept, c in list(index.items()):  # plurals, unless a plural is a concept of its own
        for form in plurals(concept):
            index.setdefault(form, c)
    uses: list[Counter[int]] = [Counter() for _ in concepts]  # places in runs of several words
    alone = [0] * len(concepts)
    for caption in captions:
        found = [index.get(w) for w in _WORD.findall(caption.lower())]
        end = len(found)
        for i in range(len(found) - 1, -1, -1):
            if found[i] is None:
                end = i
            elif end - i == 1 and (i == 0 or found[i - 1] is None):
                alone[found[i]] += 1
            else:
                uses[found[i]][end - 1 - i] += 1
    # The commonest place; a tie goes to the later one (the smaller count of words after it).
    return [max(u.items(), key=lambda kv: (kv[1], -kv[0]))[0] if u and sum(u.values()) >= alone[c] else -1
            for c, u in enumerate(uses)]


def concept_targets(captions: Sequence[str], concepts: Sequence[str],
                    scenes: Sequence[dict[str, Any] | None] | None = None) -> torch.Tensor:
    """(B, C) float tensor: 1 where caption b names concept c or scene b (when given) makes it true, else 0."""
    phrases = [tuple(_WORD.findall(concept.lower())) for concept in concepts]
    longest = max((len(p) for p in phrases), default=0)
    singular = {}
    for phrase in phrases:
        for form in plurals(phrase[-1]):
            singular.setdefault(form, phrase[-1])
    targets = torch.zeros(len(captions), len(phrases))
    for b, caption in enumerate(captions):
        words = [singular.get(w, w) for w in _WORD.findall(caption.lower())]
        said = {tuple(words[i:i + n]) for n in range(1, longest + 1) for i in range(len(words) - n + 1)}
        scene = scenes[b] if scenes is not None else None
        true = scene_concepts(scene) if isinstance(scene, dict) and "objects" in scene else set()
        for c, phrase in enumerate(phrases):
            if phrase in said or canonical(" ".join(phrase)) in true:
                targets[b, c] = 1.0
    return targets
