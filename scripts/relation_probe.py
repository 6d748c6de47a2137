"""Relation probe: when a checkpoint states a relation, does it state it the right way round?

Beam search rarely chooses a relational caption (docs/models.md), so ``capcli evaluate``'s
``grounding_relation_accuracy`` rests on a handful of captions. This probe asks for one: for
each image of a split whose scene graph records a relation, the first relational reference
caption is cut after its relation phrase ("a red circle is to the left of") and the model
writes the rest, as ``capcli evaluate`` decodes (beams 5, concept guidance), once with
``decode.spatial_guidance`` and once without. The completed captions are read by the grounding
metrics: ``relation_accuracy`` is the share of stated relations that hold, with a 95% bootstrap
interval; ``hallucination_rate`` (CHAIR-s) says whether the completion names an object that
is not there. The data are the default settings' (the README job's), or ``--config``'s.

    python scripts/relation_probe.py --checkpoint runs/pretrain --split test

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from capcli.data.batches import load_image_field
from capcli.data.images import resize_center_crop
from capcli.data.sources import load_splits
from capcli.metrics.grounding import grounding_intervals, grounding_metrics
from capcli.model import Captioner
from capcli.model.generation import quiet_transformers
from capcli.model.guidance import ConceptGuidance
from capcli.scenes.reader import parse_layout
from capcli.settings import load_settings
from capcli.train.checkpoint import resolve_checkpoint


def prompts(split) -> list[tuple[int, str]]:
    """(row, the caption up to its first relation phrase) for the rows with a relational reference."""
    out = []
    for row, captions in enumerate(split["captions"]):
        for caption in captions:
            parsed = parse_layout(caption)
            if parsed and parsed[1].links:
                words, (_, end) = parsed[1].tokens, parsed[1].links[0]
                out.append((row, caption[: words[end - 1][2]]))
                break
    return out


@torch.no_grad()
def complete(model: Captioner, pixels: torch.Tensor, prompt: str, spatial: bool, beams: int = 5) -> str:
    """The caption ``prompt`` continued by beam search from one image."""
    features = model.image_features(pixels[None])
    prefix = model.prefix(features)  # (1, K, D)
    ids = model.tokenizer(" " + prompt, add_special_tokens=False, return_tensors="pt").input_ids
    embeds = torch.cat([prefix, model.decoder.get_input_embeddings()(ids)], dim=1)
    # The prefix positions get the pad id, which is no concept word: guidance reads the prompt's words.
    history = torch.cat([torch.full((1, prefix.shape[1]), model.pad_id, dtype=torch.long), ids], dim=1)
    guide = LogitsProcessorList([ConceptGuidance(model, features, 1.0, beams, spatial)])
    with quiet_transformers():
        out = model.decoder.generate(inputs_embeds=embeds, input_ids=history,
                                     attention_mask=torch.ones_like(history), max_new_tokens=24,
                                     num_beams=beams, do_sample=False, logits_processor=guide,
                                     eos_token_id=model.tokenizer.eos_token_id,
                                     pad_token_id=model.tokenizer.pad_token_id)
    rest = model.tokenizer.decode(out[0, history.shape[1]:], skip_special_tokens=True)
    return f"{prompt} {rest.strip()}".strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--config", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Captioner.from_pretrained(resolve_checkpoint(args.checkpoint)).eval()
    settings = load_settings(config=args.config)
    split = load_splits(settings.data)[args.split]
    asked = prompts(split)
    report: dict = {"checkpoint": str(args.checkpoint), "split": args.split, "n": len(asked)}
    for spatial in (False, True):
        captions, scenes = [], []
        for row, prompt in asked:
            image = resize_center_crop(load_image_field(split[row]["image"], settings.data.max_pixels), model.image_size)
            captions.append(complete(model, image, prompt, spatial))
            scenes.append(split[row]["scene"])
        scores = grounding_metrics(captions, scenes)
        intervals = grounding_intervals(scores)
        report["spatial" if spatial else "plain"] = {
            name: {"value": scores.corpus[name], "low": intervals[name][0], "high": intervals[name][1]}
            for name in ("relation_accuracy", "relations_stated", "hallucination_rate", "recall")}
        report["examples_" + ("spatial" if spatial else "plain")] = captions[:5]
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
