"""Captions from image files to caption strings, by capcli and by each peer the way its users write it.

- capcli: ``ImageCaptioner.caption`` (the safe loader, resize, batched ``generate`` with the KV cache);
- VisionEncoderDecoder: PIL, its image processor, batched ``generate``, ``batch_decode``;
- CoCa: open_clip's preprocessing transform, ``CoCa.generate``, ``open_clip.decode``, with
  :class:`BeamScorer` lent to open_clip where the installed transformers lacks its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capcli.api import ImageCaptioner
from capcli.bench.measure import synchronize
from capcli.bench.peer_models import Peer
from capcli.model.generation import quiet_transformers


def _images(files: Sequence[Path]) -> list:
    from PIL import Image

    images = []
    for file in files:
        with Image.open(file) as image:
            images.append(image.convert("RGB"))
    return images


@dataclass
class CaptionRun:
    """One pass of a side over the images: its seconds, and the tokens it wrote a caption."""

    seconds: float
    tokens: float
    captions: list[str]


def caption_capcli(captioner: ImageCaptioner, files: Sequence[Path], beams: int, tokens: int) -> CaptionRun:
    """capcli's caption path: files → ``ImageCaptioner.caption`` (batches of ``captioner.batch_size``)."""
    start = time.perf_counter()
    out = captioner.caption(list(files), beams=beams, max_length=tokens, min_length=tokens, concept_guidance=0.0)
    synchronize(captioner.device)
    seconds = time.perf_counter() - start
    return CaptionRun(seconds, sum(c.tokens for c in out) / len(out), [c.text for c in out])


@torch.no_grad()
def caption_ved(peer: Peer, files: Sequence[Path], batch: int, beams: int, tokens: int,
                autocast: Callable[[], Any]) -> CaptionRun:
    """A VisionEncoderDecoder model's captions as its users write them: PIL, the image processor,
    ``generate``, ``batch_decode``; ``tokens`` new tokens a caption."""
    device = next(peer.model.parameters()).device
    captions, written = [], []
    start = time.perf_counter()
    for at in range(0, len(files), batch):
        pixels = peer.preprocess(_images(files[at : at + batch])).to(device)
        with autocast(), quiet_transformers():
            ids = peer.model.generate(pixel_values=pixels, num_beams=beams, max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False)
        captions += peer.decode(ids)
        written.append(ids.shape[1] - 1)  # after the decoder start token
    synchronize(device)
    seconds = time.perf_counter() - start
    return CaptionRun(seconds, sum(written) / len(written), captions)


@torch.no_grad()
def caption_coca(peer: Peer, files: Sequence[Path], batch: int, beams: int, tokens: int,
                 autocast: Callable[[], Any]) -> CaptionRun:
    """open_clip's ``CoCa.generate`` as its README calls it: its transform, ``generate``, ``open_clip.decode``.

    Beams 1 is ``generation_type="top_k"`` with ``top_k=1`` (open_clip's greedy); beams > 1 is
    its beam search with one beam group (plain beam search, as the other sides run). Both run
    ``tokens`` decoder steps: ``seq_len`` counts the start token, and end-of-text is barred
    before ``tokens`` tokens.
    """
    device = next(peer.model.parameters()).device
    search = ({"generation_type": "top_k", "top_k": 1} if beams == 1
              else {"generation_type": "beam_search", "num_beams": beams, "num_beam_groups": 1})
    captions, written = [], []
    start = time.perf_counter()
    with coca_generate_available():
        for at in range(0, len(files), batch):
            pixels = peer.preprocess(_images(files[at : at + batch])).to(device)
            with autocast():
                ids = peer.model.generate(pixels, seq_len=tokens + 1, min_seq_len=tokens, **peer.special, **search)
            captions += peer.decode(ids)
            written.append(ids.shape[1] - 1)  # after the start token
    synchronize(device)
    seconds = time.perf_counter() - start
    return CaptionRun(seconds, sum(written) / len(written), captions)


@contextmanager
def coca_generate_available() -> Iterator[str]:
    """Let ``CoCa.generate`` run with the installed transformers; yields how it runs.

    open_clip's ``coca_model`` imports its logits processors and ``BeamSearchScorer`` from
    transformers in one ``try``; transformers 5 removed ``BeamSearchScorer``, so the import
    fails and every ``generate`` call stops at ``assert _has_transformers``, greedy included,
    though only beam search needs the scorer. Where that happened, this lends the module
    :class:`BeamScorer` (transformers 4's rule) for the block; open_clip's own search loop
    runs unchanged around it.
    """
    from open_clip import coca_model

    if coca_model._has_transformers:
        yield "open_clip's CoCa.generate, with transformers' BeamSearchScorer"
        return
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    saved = coca_model.GENERATION_TYPES.copy()
    had = hasattr(coca_model, "BeamSearchScorer")
    coca_model.GENERATION_TYPES.update(top_k=TopKLogitsWarper, top_p=TopPLogitsWarper)
    coca_model.BeamSearchScorer = BeamScorer
    coca_model._has_transformers = True
    try:
        yield ("open_clip's CoCa.generate; the installed transformers has no BeamSearchScorer (removed in 5.0), "
               "so capcli.bench.peer_captions.BeamScorer stands in for it (transformers 4's rule)")
    finally:
        coca_model._has_transformers = False
        coca_model.GENERATION_TYPES.clear()
        coca_model.GENERATION_TYPES.update(saved)
        if not had:
            del coca_model.BeamSearchScorer


class BeamScorer:
    """The part of transformers 4's ``BeamSearchScorer`` that open_clip's CoCa beam search calls.

    The rule (length penalty 1, ``early_stopping=False``): each step, per image, the ``2·beams``
    best continuations are walked in order; one that ends in end-of-text among the first
    ``beams`` ranks is kept as finished, scored ``sum / length``; the first ``beams`` others run
    on. An image is done once ``beams`` are finished and the best running sum over the current
    length cannot beat the worst finished score. ``finalize`` adds the running beams of images
    not done and returns each image's best sequence, end-of-text after a finished one, padded to the
    longest.
    """

    def __init__(self, batch_size: int, num_beams: int, device: torch.device, num_beam_groups: int = 1):
        if num_beam_groups != 1:
            raise ValueError("capcli.bench.peer_captions.BeamScorer runs plain beam search (num_beam_groups=1)")
        self.num_beams, self.num_beam_groups, self.device = num_beams, 1, device
        self._beam_hyps = [[] for _ in range(batch_size)]  # per image: (score, token row), at most num_beams
        self._done = [False] * batch_size

    @property
    def is_done(self) -> bool:
        return all(self._done)

    def _add(self, image: int, score: float, row: torch.Tensor) -> None:
        hyps = self._beam_hyps[image]
        if len(hyps) < self.num_beams or score > hyps[-1][0]:
            hyps.append((score, row))
            hyps.sort(key=lambda h: -h[0])
            del hyps[self.num_beams :]

    def process(self, input_ids: torch.Tensor, next_scores: torch.Tensor, next_tokens: torch.Tensor,
                next_indices: torch.Tensor, pad_token_id: int | None = None, eos_token_id: Any = None,
                beam_indices: Any = None, group_index: int = 0, decoder_prompt_len: int = 0) -> dict[str, torch.Tensor]:
        beams = self.num_beams
        eos = {int(e) for e in torch.as_tensor(eos_token_id).flatten().tolist()}
        length = input_ids.shape[-1] + 1 - decoder_prompt_len
        batch = len(self._beam_hyps)
        scores = torch.zeros(batch, beams, dtype=next_scores.dtype, device=self.device)
        tokens = torch.full((batch, beams), pad_token_id or 0, dtype=next_tokens.dtype, device=self.device)
        indices = torch.zeros(batch, beams, dtype=next_indices.dtype, device=self.device)
        for image in range(batch):
            if self._done[image]:
                continue  # pads, beam 0 of the image
            slot = 0
            for rank, (score, token, index) in enumerate(zip(next_scores[image].tolist(),
                                                             next_tokens[image].tolist(),
                                                             next_indices[image].tolist(), strict=True)):
                row = image * beams + index
                if token in eos:
                    if rank < beams:
                        self._add(image, score / length, input_ids[row].clone())
                    continue
                scores[image, slot], tokens[image, slot], indices[image, slot] = score, token, row
                slot += 1
                if slot == beams:
                    break
            best_running = next_scores[image].max().item() / length
            hyps = self._beam_hyps[image]
            self._done[image] = len(hyps) == beams and hyps[-1][0] >= best_running
            if self._done[image]:
                indices[image] = image * beams
        return {"next_beam_scores": scores.view(-1), "next_beam_tokens": tokens.view(-1),
                "next_beam_indices": indices.view(-1)}

    def finalize(self, input_ids: torch.Tensor, final_beam_scores: torch.Tensor, final_beam_tokens: Any,
                 final_beam_indices: Any, max_length: int, pad_token_id: int | None = None,
                 eos_token_id: Any = None, beam_indices: Any = None, decoder_prompt_len: int = 0) -> dict[str, torch.Tensor]:
        beams, length = self.num_beams, input_ids.shape[-1] - decoder_prompt_len
        for image, done in enumerate(self._done):
            if not done:
                for b in range(beams):
                    row = image * beams + b
                    self._add(image, final_beam_scores[row].item() / length, input_ids[row])
        best = [hyps[0][1] for hyps in self._beam_hyps]
        width = min(max(len(row) for row in best) + 1, max_length)
        eos = int(torch.as_tensor(eos_token_id).flatten()[0])
        out = torch.full((len(best), width), pad_token_id or 0, dtype=input_ids.dtype, device=input_ids.device)
        for image, row in enumerate(best):
            out[image, : len(row)] = row
            if len(row) < width:  # a finished caption gets its end-of-text back
                out[image, len(row)] = eos
        return {"sequences": out, "sequence_scores": torch.tensor([h[0][0] for h in self._beam_hyps])}
