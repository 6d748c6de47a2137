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

Each peer is sized from the capcli model measured (:mod:`capcli.bench.peer_models`): the
same image size, widths, depths, heads and vocabulary; weights are random, as capcli's are
unless ``--checkpoint`` is given. Every side writes exactly :data:`CAPTION_TOKENS` tokens a
caption (end-of-text barred before them, :mod:`capcli.bench.peer_captions`), so each does the
same number of decoding steps whatever its weights. The peers are optional (the ``peers``
extra); the benchmark skips those that cannot be built here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from capcli.api import ImageCaptioner
from capcli.bench.measure import interleaved, synchronize
from capcli.bench.peer_captions import (
    CaptionRun,
    caption_capcli,
    caption_coca,
    caption_ved,
    coca_generate_available,
)
from capcli.bench.peer_models import (
    PEER_NAMES,
    PEER_PACKAGES,
    PEERS,
    Peer,
    build_peers,
    missing_peers,
    peer_versions,
)
from capcli.bench.training import Counted, pretrain_flops, timed_fit
from capcli.data.batches import CaptionBatch, CaptionCollator, caption_dataset
from capcli.data.sources import load_splits
from capcli.model import Captioner
from capcli.model.generation import quiet_transformers
from capcli.objectives import PretrainObjective
from capcli.train.engine import TrainData

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
    with quiet_transformers():  # "passing an attention_mask" warning: the padding is on the right, causal
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
        synchronize(device)
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
        runs = dict(zip(sides, interleaved([partial(side, beams) for side in sides.values()], repeats), strict=True))
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
    p, engine = settings.pretrain, settings.pretrain.engine
    per_step = engine.batch_size * engine.grad_accum
    split = load_splits(settings.data)["train"]
    words = tuple(model.config.concept_words) if p.concept_weight else ()
    dataset = caption_dataset(split, model.image_size, settings.data)
    collate = CaptionCollator(model.tokenizer, settings.data.max_caption_tokens, words)
    objective = PretrainObjective(p.contrastive_weight, p.caption_weight, concept_weight=p.concept_weight,
                                  token_dropout=p.token_dropout)
    counted = Counted(objective, partial(pretrain_flops, model), lambda batch: int(batch.caption_mask.sum()))
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
    peaks, fast, *peer_runs = interleaved([peak, *runs], repeats)
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
