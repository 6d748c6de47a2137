"""Captioning from a ``capcli export`` folder with onnxruntime, numpy and tokenizers: no PyTorch.

:class:`OnnxCaptioner` runs the greedy search of ``capcli caption --beams 1`` over the exported
graphs (``export.py``): end-of-text barred before ``min_length`` tokens, concept guidance
added to the logits as ``guidance.ConceptGuidance`` adds it, a finished caption padded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from capcli.errors import CapcliError, ConfigError

INSTALL_HINT = 'ONNX export needs onnx and onnxruntime: pip install "capcli[onnx]" (or pip install onnx onnxruntime)'
DECODING_FILE = "decoding.json"


def require_onnx() -> None:
    """Raise ConfigError (exit 2) with the install command when onnx or onnxruntime is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


class OnnxCaptioner:
    """Greedy captions from an export folder, with onnxruntime and numpy only.

    The search is ``capcli caption --beams 1``'s: end-of-text barred before ``min_length``
    tokens, concept guidance added to the logits, a finished caption padded.
    """

    def __init__(self, folder: Path, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.settings = json.loads((folder / DECODING_FILE).read_text(encoding="utf-8"))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.vision = ort.InferenceSession(str(folder / "vision.onnx"), options, providers=providers)
        self.decoder = ort.InferenceSession(str(folder / "decoder.onnx"), options, providers=providers)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def caption_pixels(self, pixels, max_length: int | None = None, concept_guidance: float | None = None) -> list[str]:
        """(B, 3, S, S) uint8 numpy pixels → B captions."""
        import numpy as np

        s = self.settings
        max_length = s["max_length"] if max_length is None else max_length
        weight = s["concept_guidance"] if concept_guidance is None else concept_guidance
        prefix, alone, follows = self.vision.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})
        batch, width = prefix.shape[0], prefix.shape[2]
        ids = np.asarray(s["concept_token_ids"], dtype=np.int64)
        slot = np.full(s["vocab_size"], -1, dtype=np.int64)
        slot[ids] = np.arange(len(ids))
        past = {f"past_{kind}_{i}": np.zeros((batch, s["heads"], 0, s["head_dim"]), dtype=np.float32)
                for i in range(s["layers"]) for kind in ("key", "value")}
        feed_prefix, feed_ids = prefix.astype(np.float32), np.zeros((batch, 0), dtype=np.int64)
        done = np.zeros(batch, dtype=bool)
        out = np.full((batch, max_length), s["pad_token_id"], dtype=np.int64)
        last = None
        for step in range(max_length):
            logits, *present = self.decoder.run(None, {"prefix": feed_prefix, "input_ids": feed_ids, **past})
            scores = logits[:, -1].astype(np.float32)
            if step < s["min_length"]:
                scores[:, s["eos_token_id"]] = -np.inf
            if weight and len(ids):
                bias = weight * alone
                if s["concept_patches"] and last is not None:
                    after = slot[last]
                    rows = np.nonzero(after >= 0)[0]
                    bias = bias.copy()
                    bias[rows] = weight * follows[rows, after[rows]]
                if s.get("concept_slots"):
                    scores[:, ids] = fill_slots(scores[:, ids], bias, s["concept_slots"], s["concept_prior"])
                else:
                    scores[:, ids] += bias
            token = scores.argmax(axis=1)
            token = np.where(done, s["pad_token_id"], token)
            out[:, step] = token
            done |= token == s["eos_token_id"]
            if done.all():
                break
            last = token
            past = dict(zip(past, present, strict=True))
            feed_prefix, feed_ids = np.zeros((batch, 0, width), dtype=np.float32), token[:, None]
        return [self.tokenizer.decode([int(t) for t in row], skip_special_tokens=True).strip() for row in out]


def fill_slots(scores, bias, layout: dict, prior: float):
    """``guidance.SlotFill`` in numpy: (B, K) scores and bias of the concept tokens → (B, K).

    ``layout``: decoding.json's ``concept_slots``, each token's word (-1: additive) and each word's slot.
    """
    import numpy as np

    word = np.asarray(layout["token_words"])
    slot = np.asarray(layout["word_slots"])
    out = scores + bias
    with np.errstate(invalid="ignore", divide="ignore"):
        words = np.stack([_logsumexp(scores[:, word == w]) for w in range(len(slot))], axis=1)  # (B, W)
        word_bias = np.stack([bias[:, np.flatnonzero(word == w)[0]] for w in range(len(slot))], axis=1)
        choice = np.where(np.isneginf(words), words, prior * words + word_bias)
        for g in np.unique(slot):
            members = np.flatnonzero(slot == g)
            mass, total = _logsumexp(words[:, members]), _logsumexp(choice[:, members])
            for w in members:
                share = np.where(np.isneginf(total), total, choice[:, w] - total)
                k = word == w
                filled = (mass + share - words[:, w])[:, None] + scores[:, k]
                out[:, k] = np.where(np.isneginf(scores[:, k]), scores[:, k], filled)
    return out


def _logsumexp(x):
    """log Σ exp over the last axis of a (B, N) array, -inf where every entry is -inf."""
    import numpy as np

    top = x.max(axis=1)
    safe = np.where(np.isneginf(top), 0.0, top)
    return np.log(np.exp(x - safe[:, None]).sum(axis=1)) + safe


def time_captioning(captioner: OnnxCaptioner, pixels, batch_size: int, repeats: int) -> list[float]:
    """Seconds to caption ``pixels`` in batches, ``repeats`` times after one warm-up."""
    captioner.caption_pixels(pixels[:batch_size])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(pixels), batch_size):
            captioner.caption_pixels(pixels[i : i + batch_size])
        times.append(time.perf_counter() - start)
    return times


def check_folder(folder: Path) -> None:
    """Raise CapcliError unless ``folder`` holds an export."""
    missing = [name for name in ("vision.onnx", "decoder.onnx", DECODING_FILE, "tokenizer.json")
               if not (Path(folder) / name).is_file()]
    if missing:
        raise CapcliError(f"{folder} is not a capcli ONNX export (missing {', '.join(missing)})")
