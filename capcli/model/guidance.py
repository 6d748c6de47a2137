"""Concept-guided decoding: the concept head's detections as soft constraints on the search.

``ConceptGuidance`` is a transformers ``LogitsProcessor`` (``generation._generate`` adds it):
words the head does not see are penalised, a concept word after another is bound by the patch
that shows both, spatial phrases by the side of their subject, and, where the checkpoint records
its concept words' slots, ``SlotFill`` shares each slot's probability out by the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor

from capcli.data.concepts import plurals
from capcli.model import Captioner
from capcli.settings import DecodeSettings

# Where the object of a spatial phrase lies from its subject, in image coordinates (x right, y
# down): "A left of B" puts B to A's right. English, not the synthetic grammar's own list.
SPATIAL_PHRASES = {"left of": (1.0, 0.0), "right of": (-1.0, 0.0), "above": (0.0, 1.0), "over": (0.0, 1.0),
                   "below": (0.0, -1.0), "under": (0.0, -1.0), "beneath": (0.0, -1.0)}


class ConceptGuidance(LogitsProcessor):
    """Soft constraints from the concept head: the words it does not see in the image are penalised.

    The terms below are the bias b. A checkpoint that records its concept words' slots applies
    it within each slot (``SlotFill``: the decoder keeps the slot's probability, the head shares
    it out); an older one adds it to the scores, as described here.

    Each concept word (and its plural) that the tokenizer writes as one token gets
    ``λ · log σ(logit)`` added to its next-token score: about 0 for a word the head sees,
    strongly negative for one it does not. It is the soft form of constrained beam search on
    detected words (Anderson et al. 2017, "Guided open vocabulary image captioning with
    constrained beam search"), which carried captioners to objects absent from their caption
    data. Here it carries them to unseen colour-shape pairs: on test_novel the head on the
    patch tokens tells the shape of a single object 76% of the time, the unguided decoder
    names it 32% of the time, falling back on the pairs it has seen (docs/models.md).

    Where the head reads each patch (``concept_source`` "patches"), a concept word that
    follows another is scored by where they are: after "yellow", "circle" gets
    ``λ · log(max_n σ(yellow_n)·σ(circle_n) / max_n σ(yellow_n))`` over the patches n, the most
    confident patch showing both over the most confident showing the first (a mean over the
    patches, tried first, dropped words: test CIDEr-D 3.40 against 3.82). So the words
    of one object are bound by its place in the image, from factors detected separately, and
    an unseen pair binds as a seen one does.

    Spatial phrases are bound the same way, where the direction is chosen and where the object
    is named. Once a caption has named an object (the subject: the patch that shows "red" and
    "circle" best), each phrase's first word (" left", " above", …) gains
    ``λ · log(max_{n on that side} t_n / max_n t_n)``, ``t_n`` the most confident concept word
    of patch n other than the subject's own: a side with nothing else on it makes its phrase
    unlikely. After the phrase, the object's first concept word gains
    ``λ · log(max_{n on that side} σ(w_n) / max_n σ(w_n))`` and each later one the binding above
    within that side. "That side" is where one axis is at least 1.5 times the other, as the
    scene graph names a relation. The decoder alone says "left of" or "right of" at chance
    (docs/models.md).
    """

    def __init__(self, model: Captioner, features: torch.Tensor, weight: float, beams: int, spatial: bool = True,
                 prior: float = DecodeSettings.model_fields["concept_prior"].default):
        ids, columns = concept_token_ids(model)
        self.ids = torch.tensor(ids, dtype=torch.long, device=features.device)  # (K,) vocabulary ids
        layout = slot_layout(model.config.concept_slots, columns, len(model.config.concept_words))
        self.slots = None if layout is None else SlotFill(*layout, prior, features.device)
        columns = torch.tensor(columns, dtype=torch.long, device=features.device)  # (K,) their concept words
        self.follows = None
        if not ids:
            self.alone = torch.zeros(features.shape[0] * beams, 0, device=features.device)
            return
        self.alone = weight * F.logsigmoid(model.concept_logits(features).float()[:, columns])  # (B, K)
        if model.config.concept_source == "patches":
            shown = torch.sigmoid(model.concept_head(features[:, 1:]).float())  # (B, N, C)
            # The most confident patch that shows both, over the most confident that shows the first.
            both = (shown.unsqueeze(-1) * shown.unsqueeze(-2)).amax(dim=1)  # (B, C, C)
            together = both / shown.amax(dim=1).unsqueeze(-1).clamp_min(1e-12)  # 0/0 where σ underflows
            self.follows = weight * together[:, columns][:, :, columns].clamp_min(1e-6).log()  # (B, K, K)
            self.follows = self.follows.repeat_interleave(beams, dim=0)
            # The position of each vocabulary id among the concept tokens, -1 for any other token.
            self.slot = torch.full((model.decoder.config.vocab_size,), -1, dtype=torch.long, device=features.device)
            self.slot[self.ids] = torch.arange(len(ids), device=features.device)
            side = round(shown.shape[1] ** 0.5)  # the patches of a square grid, in rows
            self.phrases = spatial_token_phrases(model.tokenizer) if spatial and side * side == shown.shape[1] else []
            if self.phrases:
                self.weight, self.beams, self.columns = weight, beams, columns
                self.shown = shown[:, :, columns]  # (B, N, K): each concept token's word, per patch
                self.directions = sorted(set(SPATIAL_PHRASES.values()))
                self.regions = _regions(side, self.directions, features.device)  # (U, N, N)
                # The first token of each phrase ("left" of "left of"), where the direction is chosen.
                # Only where that token is the whole first word: a tokenizer that never saw "above"
                # writes it in pieces, and its first piece (" a") opens other words too.
                starts = {tokens[0]: direction for (tokens, direction), phrase in zip(self.phrases, SPATIAL_PHRASES)
                          if model.tokenizer.decode(tokens[:1]).strip() == phrase.split()[0]}
                self.start_ids = list(starts)
                self.starts = torch.tensor(self.start_ids, dtype=torch.long, device=features.device)
                self.start_sides = torch.tensor([self.directions.index(d) for d in starts.values()],
                                                dtype=torch.long, device=features.device)
        self.alone = self.alone.repeat_interleave(beams, dim=0)  # generate expands each image into its beams in a row

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bias, sides = self.alone, None
        if self.follows is not None and input_ids.shape[1]:
            after = self.slot[input_ids[:, -1]]  # (B·beams,) the concept token just written, or -1
            rows = (after >= 0).nonzero(as_tuple=True)[0]
            if len(rows):
                bias = bias.clone()
                bias[rows] = self.follows[rows, after[rows]]
            if self.phrases:
                bias, sides = self._spatial(input_ids, bias)
        scores = scores.clone()
        if self.slots is not None:
            scores[:, self.ids] = self.slots(scores[:, self.ids], bias.to(scores.dtype))
        else:
            scores[:, self.ids] += bias.to(scores.dtype)
        if sides is not None:
            scores[:, self.starts] += sides.to(scores.dtype)
        return scores

    def _spatial(self, input_ids: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows' concept-token bias with the spatial terms, and the bias of the phrase-opening
        tokens (" left", " above", ...) for the rows whose caption has just named a subject."""
        slots = self.slot[input_ids].tolist()  # (rows, T): each token's concept slot, or -1
        history = input_ids.tolist()
        subjects: list[tuple[int, list[int]]] = []  # rows whose caption has just named an object
        objects = []  # rows naming the object of a phrase
        for row, (ids, slot) in enumerate(zip(history, slots)):
            found = _spatial_object(ids, slot, self.phrases)
            if found is not None:
                objects.append((row, found))
            elif self.start_ids and (subject := _last_mention(ids, slot, len(ids), 5, self.start_ids)):
                subjects.append((row, subject))
        sides = self._sides(subjects, len(history), bias) if subjects else None
        if objects:
            bias = bias.clone()  # it may be ``self.alone`` itself, which later steps read
        for row, found in objects:
            shown = self.shown[row // self.beams]  # (N, K)
            subject, direction, named = found
            mask = torch.zeros(shown.shape[1], dtype=torch.bool, device=shown.device)
            mask[subject] = True
            region = self.regions[self.directions.index(direction), _subject_patch(shown, mask)]
            if not region.any():
                continue
            if named:  # after the object's first word: the binding of ``follows``, within the region
                seen = shown[region][:, named].prod(dim=1, keepdim=True)  # (R, 1)
                kept = (shown[region] * seen).amax(dim=0) / seen.amax().clamp_min(1e-12)
                bias[row] = self.weight * kept.clamp_min(1e-6).log()
            else:  # its first word: seen in the region as well as anywhere
                kept = shown[region].amax(dim=0) / shown.amax(dim=0).clamp_min(1e-12)
                bias[row] = self.alone[row] + self.weight * kept.clamp(1e-6, 1.0).log()
        return bias, sides

    def _sides(self, subjects: list[tuple[int, list[int]]], rows: int, bias: torch.Tensor) -> torch.Tensor:
        """(rows, S) the bias of each phrase's first word after a subject, all such rows at once:
        ``λ·log(max_{n on that side} t_n / max_n t_n)``, ``t_n`` patch n's most confident concept
        word other than the subject's own (its plural included)."""
        index = torch.tensor([row for row, _ in subjects], device=bias.device)
        mask = torch.zeros(len(subjects), len(self.columns), dtype=torch.bool, device=bias.device)  # (R, K)
        for k, (_, subject) in enumerate(subjects):
            mask[k, subject] = True
        shown = self.shown[index // self.beams]  # (R, N, K)
        where = _subject_patch(shown, mask)  # (R,)
        own = (mask.float() @ (self.columns[:, None] == self.columns[None, :]).float()) > 0  # (R, K) its words
        thing = shown.masked_fill(own[:, None, :], 0.0).amax(dim=2)  # (R, N)
        regions = self.regions[self.start_sides][:, where].transpose(0, 1)  # (R, S, N)
        most = thing.amax(dim=1, keepdim=True)  # (R, 1); 0 where every word is the subject's: no say
        kept = torch.where(most > 0, (thing[:, None, :] * regions).amax(dim=2) / most.clamp_min(1e-12), 1.0)
        sides = bias.new_zeros(rows, len(self.start_ids))
        sides[index] = self.weight * kept.clamp(1e-6, 1.0).log()
        return sides


def slot_layout(slots: list[int], columns: list[int], words: int) -> tuple[list[int], list[int]] | None:
    """Which word each concept token is a form of, and which slot each such word fills: (K,) word
    index per token (-1 for a token whose concept has no slot shared with another word) and (W,)
    slot per word; None when there is no such slot, or the checkpoint records none (written before
    slots: its guidance stays additive)."""
    if not slots or not columns:
        return None
    if len(slots) != words:
        raise ValueError(f"the checkpoint records {len(slots)} concept slots for {words} concept words")
    named = sorted(set(columns))
    shared = {slot for slot in {slots[c] for c in named} if slot >= 0 and sum(slots[c] == slot for c in named) > 1}
    named = [c for c in named if slots[c] in shared]  # a slot of one word has nothing to share
    if not named:
        return None
    return [named.index(c) if c in named else -1 for c in columns], [slots[c] for c in named]


class SlotFill:
    """Concept guidance that keeps each slot's probability: the decoder says *when* a word of a slot
    comes (a shape, a colour, a size) and in which form, the concept head, with the decoder's own
    preference tempered by ``prior``, says *which* word.

    For the concept tokens of one slot, with s the decoder's scores, b ≤ 0 the guidance bias
    (``ConceptGuidance``) and L_w = log Σ_{forms f of w} exp s_f each word's score:

        s'_f = log Σ_{slot} exp s  +  log softmax_w(prior · L_w + b_w)  +  (s_f − L_w)

    The slot keeps the decoder's probability; the head, with the decoder's preference tempered by
    ``prior``, shares it among the words; each word's forms ("circle", "circles") keep the
    decoder's odds. So the head cannot keep a whole slot out: after "yellow" some shape comes, the
    one the head binds to yellow best. (Cutting the slot by the head's best word as well, tried
    first, left test_novel captions without a shape where the head doubted every one: CHAIR-s
    0.497 → 0.430 but recall 0.57 → 0.45 and CIDEr-D 3.06 → 2.39; docs/models.md.) A word alone
    in its slot, or with no slot, keeps the additive bias. Neural Baby Talk (Lu et al. 2018) fills
    a caption's slots from a detector the same way; ``prior`` 0 is its form. The additive bias
    took probability from a word the head does not see and left it to whatever came next: on
    unseen colour-shape pairs, after "yellow" the decoder's "square" lost it to stray tokens ("a
    large yellowa single ...") or, renormalised over all concept words, to another colour ("a
    large yellow large yellow ..."); docs/models.md.
    """

    def __init__(self, word_of_token: list[int], slot_of_word: list[int], prior: float, device: torch.device):
        self.prior = prior
        word = torch.tensor(word_of_token, device=device)
        slot = torch.tensor(slot_of_word, device=device)
        self.filled = word >= 0  # (K,) tokens whose word has a slot
        self.word = word.clamp_min(0)  # (K,) word index, 0 for the others (they are masked out)
        forms = (word[:, None] == torch.arange(len(slot_of_word), device=device)) & self.filled[:, None]  # (K, W)
        groups = slot[:, None] == slot.unique()[None, :]  # (W, G)
        self.log_forms = torch.zeros(forms.shape, device=device).masked_fill(~forms, float("-inf"))
        self.log_groups = torch.zeros(groups.shape, device=device).masked_fill(~groups, float("-inf"))
        self.group = groups.float().argmax(dim=1)  # (W,) each word's slot, as a column of ``groups``
        self.first = forms.float().argmax(dim=0)  # (W,) one token of each word: its forms share its bias

    def __call__(self, scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(R, K) decoder scores and guidance bias of the concept tokens → (R, K) guided scores."""
        log_forms, log_groups = self.log_forms.to(scores.dtype), self.log_groups.to(scores.dtype)
        words = torch.logsumexp(scores[:, :, None] + log_forms, dim=1)  # (R, W) L_w
        word_bias = bias[:, self.first]  # (R, W) b_w
        unseen = torch.isneginf(words)  # no form may be said (no-repeat n-grams): 0·(-inf) would be NaN
        choice = torch.where(unseen, words, self.prior * words + word_bias)
        mass = torch.logsumexp(words[:, :, None] + log_groups, dim=1)[:, self.group]  # (R, W) each word's slot
        total = torch.logsumexp(choice[:, :, None] + log_groups, dim=1)[:, self.group]
        share = torch.where(torch.isneginf(total), total, choice - total)  # log softmax within the slot
        filled = mass[:, self.word] + share[:, self.word] + scores - words[:, self.word]
        filled = torch.where(torch.isneginf(scores), scores, filled)
        return torch.where(self.filled, filled, scores + bias)


def _subject_patch(shown: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(..., N, K), (..., K) → (...): the patch that shows all the masked words best (the largest
    product of their σ, summed in logs so that no product underflows to a tie)."""
    return (shown.clamp_min(1e-12).log() * mask[..., None, :]).sum(-1).argmax(dim=-1)


def _regions(side: int, directions: list[tuple[float, float]], device: torch.device) -> torch.Tensor:
    """(U, N, N) bool: for each direction u and patch p of a ``side`` × ``side`` grid (in rows), the
    patches n on that side of p, one axis at least 1.5 times the other, as the scene graph names a
    relation (``scenes.graph.compute_relations``)."""
    grid = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side
    centres = torch.stack(torch.meshgrid(grid, grid, indexing="ij")[::-1], dim=-1).reshape(-1, 2)  # (N, 2): x, y
    offset = centres[None, :, :] - centres[:, None, :]  # (N, N, 2): from p to n
    out = []
    for direction in directions:
        along = offset @ torch.tensor(direction, device=device)
        across = (offset @ torch.tensor(direction[::-1], device=device)).abs()
        out.append((along > 0) & (along >= 1.5 * across))
    return torch.stack(out)


def spatial_token_phrases(tokenizer) -> list[tuple[tuple[int, ...], tuple[float, float]]]:
    """The token ids of each spatial phrase after a space, with its direction (``SPATIAL_PHRASES``)."""
    return [(tuple(tokenizer.encode(" " + phrase, add_special_tokens=False)), direction)
            for phrase, direction in SPATIAL_PHRASES.items()]


def _last_mention(ids: list[int], slot: list[int], end: int, gap: int, stops=()) -> list[int]:
    """The concept slots of the last run of concept words before ``end`` (last word first), with
    at most ``gap`` other words after it and none of them in ``stops``; [] if there is none."""
    between = 0
    while end and slot[end - 1] < 0:
        if ids[end - 1] in stops or between == gap:
            return []
        end, between = end - 1, between + 1
    run = []
    while end and slot[end - 1] >= 0:
        end -= 1
        run.append(slot[end])
    return run


def _spatial_object(ids: list[int], slot: list[int], phrases) -> tuple[list[int], tuple[float, float], list[int]] | None:
    """Whether a caption so far is naming the object of a spatial phrase.

    Returns the concept slots of the subject (the concept words just before the phrase, with
    at most six other words between: ", which is to the"), the phrase's direction, and the slots of
    the object's words written so far; None unless the caption ends in the phrase, then at
    most one other word ("a", "two"), then an unbroken run of concept words.
    """
    end = len(ids)
    while end and slot[end - 1] >= 0:  # the object's concept words so far
        end -= 1
    named = slot[end:]
    for skip in range(2):
        for tokens, direction in phrases:
            start = end - len(tokens)
            if start > 0 and tuple(ids[start:end]) == tokens:
                subject = _last_mention(ids, slot, start, 6)
                return (subject, direction, named) if subject else None
        if skip or not end or slot[end - 1] >= 0:
            return None
        end -= 1  # the article or count word before the object's words
    return None


def concept_token_ids(model: Captioner) -> tuple[list[int], list[int]]:
    """The vocabulary ids of the concept words that are single tokens after a space, singular and
    plural, and for each the column of its word in the concept logits. Phrases are left out."""
    ids, columns = [], []
    for column, word in enumerate(model.config.concept_words):
        if " " in word:
            continue
        for form in (word, *plurals(word)):
            token = model.tokenizer.encode(" " + form, add_special_tokens=False)
            if len(token) == 1 and token[0] not in ids:
                ids.append(token[0])
                columns.append(column)
    return ids, columns
