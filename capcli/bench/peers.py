"""The tools a user would pick instead of capcli, built at capcli's sizes and timed beside it.

``capcli benchmark --sections peers`` (see :func:`capcli.bench.benchmark.run_benchmark`) times, in
one run and taking turns:

- **captioning**, from image files to caption strings, at beams 1 and 5:
  capcli's caption path (``ImageCaptioner.caption``: the safe loader, resize, batched
  ``generate`` with the KV cache); transformers' ``VisionEncoderDecoderModel`` (a ViT encoder
  and a GPT-2 decoder with cross-attention) run the way its model cards run it (PIL, its
  image processor, batched ``generate``, ``batch_decode``); and open_clip's ``CoCa.generate``
  (open_clip's preprocessing transform, ``generate``, ``open_clip.decode``).
- **training**: samples/s of capcli's pretrain step (``engine.fit``) against a CoCa step
  (contrastive + caption loss, open_clip's ``CoCaLoss``) and a VisionEncoderDecoder step
  (its own caption loss), each with AdamW and gradient clipping, on the same batch.

Each peer is sized from the capcli model measured (:func:`ved_for`, :func:`coca_for`): the
same image size, widths, depths, heads and vocabulary; weights are random, as capcli's are
unless ``--checkpoint`` is given. Every side writes exactly :data:`CAPTION_TOKENS` tokens a
caption (end-of-text barred before them), so each does the same number of decoding steps
whatever its weights. The peers are optional (the ``peers`` extra); :func:`missing_peers` says which
cannot be built here, and the benchmark skips those.
"""

from __future__ import annotations

import copy
import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from capcli.api import ImageCaptioner
from capcli.data.batches import CaptionBatch
from capcli.model import Captioner
from capcli.model.generation import _transformers_errors_only

PEERS = ("ved", "coca")
PEER_NAMES = {"ved": "transformers VisionEncoderDecoderModel (ViT + GPT-2 with cross-attention)",
              "coca": "open_clip CoCa"}
PEER_PACKAGES = {"ved": ("transformers",), "coca": ("open_clip", "transformers")}


def missing_peers() -> dict[str, str]:
    """The peers that cannot be built here, each with the reason (an import that failed)."""
    missing = {}
    for peer, check in (("ved", _import_ved), ("coca", _import_coca)):
        try:
            check()
        except ImportError as err:
            missing[peer] = f"{type(err).__name__}: {err}"
    return missing


def peer_versions() -> dict[str, str]:
    """The installed version of each package a peer uses."""
    versions = {}
    for name in ("transformers", "open_clip"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


def _import_ved() -> Any:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    return GPT2Config, GPT2LMHeadModel, ViTConfig, ViTImageProcessor, ViTModel, VisionEncoderDecoderModel


def _import_coca() -> Any:
    import open_clip
    from open_clip.coca_model import CoCa

    return open_clip, CoCa


# --- the peers, at capcli's sizes ----------------------------------------------------------------------------------


@dataclass
class Peer:
    """A peer model and what it reads images with."""

    name: str
    model: torch.nn.Module
    preprocess: Callable[[list], torch.Tensor]
    """PIL images → (B, 3, S, S) float pixels, as the peer's users prepare them."""
    decode: Callable[[torch.Tensor], list[str]]
    """(B, T) generated ids → captions."""
    special: dict[str, int] = field(default_factory=dict)
    """Token ids ``generate`` must be told (CoCa's start and end of text in a vocabulary not open_clip's)."""

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def ved_for(model: Captioner) -> Peer:
    """A ``VisionEncoderDecoderModel`` sized as ``model``: a ViT encoder of its tower's image size,
    patch, width, depth, heads and MLP ratio (a patch embedding where the tiny tower has a
    convolutional stem), and a GPT-2 decoder of its decoder's config with cross-attention added,
    on its vocabulary. The image processor resizes and normalises with the tower's mean and std."""
    GPT2Config, GPT2LMHeadModel, ViTConfig, ViTImageProcessor, ViTModel, VisionEncoderDecoderModel = _import_ved()
    arch = model.config.vision["arch"]
    encoder = ViTConfig(image_size=arch["image_size"], patch_size=arch["patch_size"], hidden_size=arch["width"],
                        num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                        intermediate_size=int(arch["width"] * arch["mlp_ratio"]), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    # GPT-2's own activation (capcli's decoder runs the fused twin, one of capcli's own levers)
    decoder = GPT2Config.from_dict({**model.decoder.config.to_dict(), "add_cross_attention": True,
                                    "is_decoder": True, "activation_function": "gelu_new"}, attn_implementation="sdpa")
    tokenizer = model.tokenizer
    ved = VisionEncoderDecoderModel(encoder=ViTModel(encoder, add_pooling_layer=False),
                                    decoder=GPT2LMHeadModel(decoder))
    ved.config.decoder_start_token_id = tokenizer.bos_token_id
    ved.config.pad_token_id = tokenizer.pad_token_id
    ved.config.eos_token_id = tokenizer.eos_token_id
    ved.generation_config.decoder_start_token_id = tokenizer.bos_token_id
    ved.generation_config.pad_token_id = tokenizer.pad_token_id
    ved.generation_config.eos_token_id = tokenizer.eos_token_id
    size = arch["image_size"]
    processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=list(model.config.vision["mean"]),
                                  image_std=list(model.config.vision["std"]))
    return Peer("ved", ved, lambda images: processor(images=images, return_tensors="pt")["pixel_values"],
                lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True))


def coca_for(model: Captioner) -> Peer:
    """An open_clip ``CoCa`` sized as ``model``.

    - the ``clip-gpt2`` preset: ``coca_ViT-B-32`` as open_clip ships it (its ViT-B/32 tower,
      a 12-layer text tower and a 12-layer multimodal decoder of width 512, 256 attention-pool
      queries, open_clip's vocabulary of 49408);
    - otherwise (tiny): the same architecture scaled to the capcli model: the tower's image
      size, patch, width, depth and heads; text and multimodal towers each of the decoder's
      width, depth and heads (``coca_ViT-B-32``'s two towers each have GPT-2 small's depth);
      as many attention-pool queries as capcli's decoder reads image positions; capcli's
      vocabulary and pad token. Its embedding width is the decoder's (open_clip passes the
      pooled image tokens, of that width, to the multimodal decoder), not capcli's 512.
    """
    open_clip, CoCa = _import_coca()
    arch, vision = model.config.vision["arch"], model.config.vision
    tokenizer = model.tokenizer
    if model.config.preset == "clip-gpt2":
        config = open_clip.get_model_config("coca_ViT-B-32")
        coca = CoCa(**{k: v for k, v in config.items() if k != "custom_text"})  # a flag for create_model
        decode, special = (lambda ids: [open_clip.decode(row) for row in ids.cpu()]), {}
    else:
        gpt = model.decoder.config
        width, heads, layers = gpt.n_embd, gpt.n_head, gpt.n_layer
        context = gpt.n_positions - model.config.prefix_length
        text = {"context_length": context, "vocab_size": gpt.vocab_size, "width": width, "heads": heads,
                "layers": layers, "embed_cls": True, "output_tokens": True, "pad_id": model.pad_id}
        coca = CoCa(
            embed_dim=width,  # open_clip feeds the pooled image tokens, of this width, to the multimodal decoder
            vision_cfg={"image_size": arch["image_size"], "patch_size": arch["patch_size"], "width": arch["width"],
                        "layers": arch["layers"], "head_width": arch["width"] // arch["heads"],
                        "mlp_ratio": arch["mlp_ratio"], "attentional_pool": True, "attn_pooler_heads": arch["heads"],
                        "attn_pooler_queries": model.config.prefix_length, "output_tokens": True},
            text_cfg=text, multimodal_cfg={**text, "attn_pooler_heads": heads},
            pad_id=model.pad_id,
        )
        decode = lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)
        # open_clip's tokenizer starts a text with a token of its own; capcli's tiny BPE starts with
        # end-of-text (GPT-2's way), which CoCa's greedy loop would read as a finished caption.
        sot = gpt.vocab_size - 1
        if sot in (tokenizer.eos_token_id, tokenizer.pad_token_id):
            raise ValueError(f"the vocabulary's last id {sot} is a special token: no row left for CoCa's start token")
        special = {"sot_token_id": sot, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    # open_clip leaves the multimodal decoder's text projection as torch.empty (pretrained weights
    # overwrite it; random memory can hold 1e37 or NaN, and the search then runs on inf), and that
    # decoder's init_parameters is never called (and fails: it reads a missing attribute). Set it
    # as open_clip's text tower sets its own projection.
    projection = coca.text_decoder.text_projection
    torch.nn.init.normal_(projection.data, std=projection.shape[0] ** -0.5)
    transform = open_clip.image_transform(arch["image_size"], is_train=False, mean=tuple(vision["mean"]),
                                          std=tuple(vision["std"]))
    return Peer("coca", coca, lambda images: torch.stack([transform(image) for image in images]), decode, special)


def build_peers(model: Captioner, peers: Sequence[str]) -> dict[str, Peer]:
    """The named peers, sized as ``model``, on its device, in eval mode."""
    device = model.pixel_mean.device
    built = {"ved": ved_for, "coca": coca_for}
    return {name: _on(built[name](model), device) for name in peers}


def _on(peer: Peer, device: torch.device) -> Peer:
    peer.model.to(device).eval()
    return peer


# --- captioning ----------------------------------------------------------------------------------------------------


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
    _sync(captioner.device)
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
        with autocast(), _transformers_errors_only():
            ids = peer.model.generate(pixel_values=pixels, num_beams=beams, max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False)
        captions += peer.decode(ids)
        written.append(ids.shape[1] - 1)  # after the decoder start token
    _sync(device)
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
    _sync(device)
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
               "so capcli.bench.peers.BeamScorer stands in for it (transformers 4's rule)")
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
            raise ValueError("capcli.bench.peers.BeamScorer runs plain beam search (num_beam_groups=1)")
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


# --- training ------------------------------------------------------------------------------------------------------


def coca_loss(peer: Peer, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's CoCa training loss on a batch: ``CoCaLoss`` with open_clip's default weights
    (caption 2, contrastive 1), the caption padded with the model's pad id."""
    from open_clip.loss import CoCaLoss

    out = peer.model(pixels, ids)
    loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=peer.model.pad_id)
    contrastive, caption = loss(out["image_features"], out["text_features"], out["logits"], out["labels"],
                                out["logit_scale"])
    return contrastive + caption


def ved_loss(peer: Peer, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A VisionEncoderDecoder model's own caption loss: ``labels`` with padding at -100 (it shifts
    them right behind the decoder start token itself)."""
    with _transformers_errors_only():  # "passing an attention_mask" warning: the padding is on the right, causal
        return peer.model(pixel_values=pixels, labels=ids.masked_fill(mask == 0, -100)).loss


def peer_batch(model: Captioner, batch: CaptionBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """capcli's training batch as the peers read it: normalised float pixels, ids padded with pad, mask."""
    device = model.pixel_mean.device
    mean = torch.tensor(model.config.vision["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.config.vision["std"], device=device).view(1, 3, 1, 1)
    pixels = (batch.pixels.to(device).float() / 255 - mean) / std
    mask = batch.caption_mask.to(device)
    ids = batch.caption_ids.to(device).masked_fill(mask == 0, model.pad_id)
    return pixels, ids, mask


@dataclass
class TrainSteps:
    """Steps 2 to N of a peer's training: seconds and samples."""

    seconds: float
    samples: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def train_peer(peer: Peer, loss_of: Callable[..., torch.Tensor], batches: Sequence[tuple],
               autocast: Callable[[], Any], clip: float | None = 1.0) -> TrainSteps:
    """One AdamW step of a peer per batch (forward, loss, backward, clipping, step); the first step is untimed.

    Args:
        peer: the peer; left in eval mode afterwards.
        loss_of: a batch's tensors → the 0-d training loss.
        batches: each step's (pixels, ids, mask), already on the device (:func:`peer_batch`).
        autocast: the run's autocast context.
        clip: the global gradient-norm clip, as capcli's engine clips (``engine.clip_grad``); None, none.
    """
    peer.model.train()
    params = [p for p in peer.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    device = params[0].device
    stamps = []
    for batch in batches:
        with autocast():
            loss = loss_of(*batch)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        stamps.append(time.perf_counter())
    peer.model.eval()
    return TrainSteps(stamps[-1] - stamps[0], (len(batches) - 1) * len(batches[0][0]))


def step_flops(run: Callable[[], torch.Tensor]) -> int:
    """Model FLOPs of one training step's forward and backward, by ``torch.utils.flop_counter``
    (matrix products, convolutions and attention: what ``capcli.bench.flops`` counts for capcli)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run().backward()
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the benchmark section -----------------------------------------------------------------------------------------

CAPTION_TOKENS = 32  # tokens every side writes a caption: DecodeSettings' default max_length


def bench_peers(report: Any, settings: Any, runtime: Any, model: Captioner, test: Any, work: Path, repeats: int,
                peak: Callable[[], float], log: Callable[[str], None]) -> None:
    """``capcli benchmark --sections peers``: capcli beside each peer that can be built here.

    Captions (beams 1 and 5, ``benchmark.images`` test images in batches of
    ``benchmark.caption_batch``, from the image files to the caption strings) and training
    (``benchmark.steps`` steps of the pretrain batch, the first untimed), each side taking
    turns with the others in every repeat. Figures ``peer_<side>_...``; ratios
    ``peer_<peer>_caption_beam{1,5}_speedup`` and ``peer_<peer>_train_speedup`` are capcli's
    rate over the peer's, repeat by repeat.
    """
    from capcli.bench.benchmark import _interleaved

    missing = missing_peers()
    versions = peer_versions()
    names = [name for name in PEERS if name not in missing]
    report.context["peers"] = {name: PEER_NAMES[name] for name in names}
    report.context["peer_versions"] = {package: versions[package] for name in PEERS for package in PEER_PACKAGES[name]}
    for name, why in missing.items():
        report.context[f"peer_{name}"] = f"skipped: {why}"
    if not names:
        log(f"benchmark: peers skipped: none can be built here ({'; '.join(missing.values())}); "
            "install transformers and open_clip_torch (pip install 'capcli[peers]')")
        return
    if missing:
        log(f"benchmark: peer(s) {', '.join(missing)} skipped ({'; '.join(missing.values())})")
    b = settings.benchmark
    autocast = runtime.autocast
    peers = build_peers(model, names)
    report.context["peer_parameters"] = {"capcli": sum(p.numel() for p in model.parameters()),
                                         **{name: peer.parameters for name, peer in peers.items()}}
    report.context["peer_caption_tokens"] = CAPTION_TOKENS
    files = image_files(test, b.images, work / "peer-images")
    captioner = ImageCaptioner(model, runtime, batch_size=b.caption_batch, max_pixels=settings.data.max_pixels)
    sides: dict[str, Callable[[int], CaptionRun]] = {
        "capcli": lambda beams: caption_capcli(captioner, files, beams, CAPTION_TOKENS)}
    if "ved" in peers:
        sides["ved"] = lambda beams: caption_ved(peers["ved"], files, b.caption_batch, beams, CAPTION_TOKENS, autocast)
    if "coca" in peers:
        sides["coca"] = lambda beams: caption_coca(peers["coca"], files, b.caption_batch, beams, CAPTION_TOKENS,
                                                   autocast)
        with coca_generate_available() as how:
            report.context["peer_coca_generate"] = how
    for beams in (1, 5):
        log(f"benchmark: peers, captions at beams {beams} ({repeats} repeats after a warm-up)")
        runs = dict(zip(sides, _interleaved([partial(side, beams) for side in sides.values()], repeats), strict=True))
        rates = {side: [len(files) / r.seconds for r in out] for side, out in runs.items()}
        for side, rate in rates.items():
            report.add(f"peer_{side}_caption_beam{beams}_images_per_s", rate)
            report.context[f"peer_{side}_caption_beam{beams}_tokens"] = runs[side][-1].tokens
        for name in peers:
            report.add(f"peer_{name}_caption_beam{beams}_speedup",
                       [c / p for c, p in zip(rates["capcli"], rates[name], strict=True)])
    log(f"benchmark: peers, training ({repeats} repeats after a warm-up)")
    bench_peer_training(report, settings, runtime, model, peers, work, repeats, peak)


def image_files(split: Any, count: int, folder: Path) -> list[Path]:
    """The first ``count`` images of a split as files: their own paths, or written out where the
    split holds only their bytes."""
    files = []
    for i, value in enumerate(split.select(range(min(count, len(split))))["image"]):
        path = value.get("path") if isinstance(value, dict) else None
        if path and Path(path).is_file():
            files.append(Path(path))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        files.append(folder / f"{i:06d}{Path(path or '.png').suffix or '.png'}")
        files[-1].write_bytes(value["bytes"])
    return files


def bench_peer_training(report: Any, settings: Any, runtime: Any, model: Captioner, peers: dict[str, Peer],
                        work: Path, repeats: int, peak: Callable[[], float]) -> None:
    """Samples/s, model FLOPs per sample and MFU of capcli's pretrain step and each peer's training step.

    capcli's side is ``engine.fit`` as ``bench_pretrain`` times it (its data loader, fused
    AdamW, clipping and schedule; the preset's losses); each peer's side is its own step on the
    same batches, already collated and on the device (forward, loss, backward, clipping, AdamW).
    """
    from capcli.bench.benchmark import Counted, _interleaved, _pretrain_flops, timed_fit
    from capcli.data.batches import CaptionCollator, caption_dataset
    from capcli.data.sources import load_splits
    from capcli.objectives import PretrainObjective
    from capcli.train.engine import TrainData

    p, engine = settings.pretrain, settings.pretrain.engine
    per_step = engine.batch_size * engine.grad_accum
    split = load_splits(settings.data)["train"]
    words = tuple(model.config.concept_words) if p.concept_weight else ()
    dataset = caption_dataset(split, model.image_size, settings.data)
    collate = CaptionCollator(model.tokenizer, settings.data.max_caption_tokens, words)
    objective = PretrainObjective(p.contrastive_weight, p.caption_weight, concept_weight=p.concept_weight,
                                  token_dropout=p.token_dropout)
    counted = Counted(objective, partial(_pretrain_flops, model), lambda batch: int(batch.caption_mask.sum()))
    data = TrainData(train=dataset, val=None, collate=collate, num_workers=settings.data.num_workers)
    runs = [partial(timed_fit, copy.deepcopy(model), counted, data, settings, runtime, "pretrain",
                    work / "peers-pretrain")]
    batches = [peer_batch(model, collate([dataset[(i, 0)] for i in range(s * per_step, (s + 1) * per_step)]))
               for s in range(engine.max_steps)]
    losses = {"ved": lambda peer, x, ids, mask: ved_loss(peer, x, ids, mask),
              "coca": lambda peer, x, ids, mask: coca_loss(peer, x, ids)}
    flops = {}
    for name, peer in peers.items():
        peer.model.train()
        flops[name] = step_flops(partial(losses[name], peer, *batches[0])) / per_step
        peer.model.zero_grad(set_to_none=True)
        runs.append(partial(train_peer, peer, partial(losses[name], peer), batches, runtime.autocast, engine.clip_grad))
    peaks, fast, *peer_runs = _interleaved([peak, *runs], repeats)
    capcli_rate = [r.per_s("samples") for r in fast]
    report.add("peer_capcli_train_samples_per_s", capcli_rate)
    report.add("peer_capcli_train_gflops_per_sample", [fast[-1].flops / fast[-1].samples / 1e9])
    report.add("peer_capcli_train_mfu", [r.per_s("flops") / pk for r, pk in zip(fast, peaks, strict=True)])
    for (name, peer), out in zip(peers.items(), peer_runs, strict=True):
        rate = [r.samples_per_s for r in out]
        report.add(f"peer_{name}_train_samples_per_s", rate)
        report.add(f"peer_{name}_train_gflops_per_sample", [flops[name] / 1e9])
        report.add(f"peer_{name}_train_mfu", [r * flops[name] / pk for r, pk in zip(rate, peaks, strict=True)])
        report.add(f"peer_{name}_train_speedup", [c / r for c, r in zip(capcli_rate, rate, strict=True)])
        report.add(f"peer_{name}_train_flops_speedup",
                   [f.per_s("flops") / (r * flops[name]) for f, r in zip(fast, rate, strict=True)])
