"""The settings groups: one pydantic model per group, each field documented beside it.

Every model forbids unknown keys, so a typo is an error that names the key, never a
silently ignored setting. Each function downstream takes only the group it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

PRESETS = ("tiny", "clip-gpt2")


class Strict(BaseModel):
    """Base for every settings group: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


StrictGroup = TypeVar("StrictGroup", bound=Strict)


class ModelSettings(Strict):
    preset: Literal["tiny", "clip-gpt2"] = "tiny"
    """Architecture: `tiny` (small ViT + small GPT-2, trained from scratch on CPU) or `clip-gpt2` (ViT-B/32 + GPT-2)."""
    vision_weights: str | None = None
    """clip-gpt2 only: an open_clip pretrained tag (e.g. `openai`), a local weights file, or `none` for random init. Default `openai`."""
    decoder: str | None = None
    """clip-gpt2 only: a GPT-2 family name (`gpt2`, `distilgpt2`, ...) or a local `save_pretrained` directory. Default `gpt2`."""
    vision_quick_gelu: bool | None = None
    """clip-gpt2 only: build the vision tower with QuickGELU. Default: what the open_clip tag says (true for `openai`); a local file says nothing, so set it true for a file of OpenAI's weights."""
    embed_dim: int = Field(512, gt=0)
    """Size of the shared image-text embedding space."""
    prefix_length: int | None = Field(None, gt=0)
    """Number of prefix embeddings the image becomes in the decoder's input. Default: 4 for tiny and 10 for clip-gpt2 (ClipCap), 16 and 32 for the resampler (BLIP-2 has 32 queries); the `tokens` mapper's prefix is the tower's token grid and cannot be set."""
    prefix_mapper: Literal["mlp", "transformer", "tokens", "resampler"] = "mlp"
    """How image features become the decoder's prefix: ClipCap's `mlp` or `transformer` mapper on the pooled vector, which keeps no position; or from the tower's patch tokens, which do: `tokens` projects each one (LLaVA), `resampler` has learned queries read them by cross-attention (Flamingo, BLIP-2)."""
    temperature: float = Field(0.07, gt=0, le=1)
    """InfoNCE temperature τ (CLIP's initial value)."""
    learn_temperature: bool = False
    """Learn τ instead of fixing it; the logit scale 1/τ is clamped at 100 as in CLIP."""
    concept_words: list[str] | None = None
    """Words (singular, lower case) that the concept head learns to detect in the images, read from the captions as weak labels, and from the scene graph where an image has one; see `pretrain.concept_weight`. A phrase counts where the caption has its words together or the scene graph makes it true ("red circle", "small circle", "circle left of square"). Default: the data source's own (`synthetic`: its six shapes, eight colours and two sizes, each a word of its own); for other sources, the most common content words of the training captions (at most 64)."""

    concept_source: Literal["pooled", "patches"] = "pooled"
    """What the concept head reads: the `pooled` vector, or each of the tower's `patches`, an image showing a word where its most confident patch does (multiple-instance learning, Fang et al. 2015), so that every patch tells its own object's shape, colour and size."""
    concept_tags: bool = False
    """Add to each patch's prefix vector the decoder's embeddings of the concept words the head sees on that patch (weighted by its confidence), so the decoder can copy a word from where it is seen (object tags, as OSCAR). Takes effect with prefix_mapper `tokens`, concept_source `patches` and a concept head (`pretrain.concept_weight` > 0); the checkpoint's model.json records whether it did."""

    @model_validator(mode="after")
    def _token_grid_sets_its_length(self) -> ModelSettings:
        if self.prefix_mapper == "tokens" and self.prefix_length is not None:
            raise ValueError("prefix_length does not apply to the tokens mapper (the tiny preset's): its prefix "
                             "is the tower's token grid; set model.prefix_mapper to resampler or mlp to choose one")
        return self

    @model_validator(mode="after")
    def _tiny_has_no_pretrained_parts(self) -> ModelSettings:
        if self.preset == "tiny" and (self.vision_weights not in (None, "none") or self.decoder is not None
                                      or self.vision_quick_gelu is not None):
            raise ValueError("the tiny preset is trained from scratch: vision_weights, vision_quick_gelu and "
                             "decoder apply to clip-gpt2 only")
        return self


class DataSettings(Strict):
    source: str = "synthetic"
    """Where the image-caption pairs come from: `synthetic`, `imagefolder:PATH`, `hf:NAME[:CONFIG]`, `disk:PATH` or `wds:PATTERN`."""
    train_size: int = Field(10000, ge=1)
    """At most this many training images."""
    val_size: int = Field(1000, ge=1)
    """At most this many validation images."""
    test_size: int = Field(1000, ge=0)
    """At most this many test images (and `test_novel` images for `synthetic`)."""
    image_size: int | None = Field(None, ge=16)
    """Synthetic images are rendered at this size. Default: the model's input resolution."""
    seed: int = 0
    """Seed of the synthetic data and of any split the loader has to make."""
    cache_dir: Path | None = None
    """Where generated data is materialised. Default: `$XDG_CACHE_HOME/capcli` or `~/.cache/capcli`."""
    image_column: str | None = None
    """Column holding the image in user data. Default: `image` (wds: `jpg` or `png`)."""
    caption_column: str | None = None
    """Column holding the caption(s) in user data: a string or a list of strings. Default: the first of `captions`, `caption`, `text` (wds: `txt`, or the caption in `json`)."""
    train_split: str | None = None
    """The source's split to train on (`hf:`, `disk:`). Default: `train`."""
    streaming: bool = False
    """`hf:` only: read the training split as a stream, downloading nothing ahead; an epoch is `train_size` samples. The source needs its own validation split; val and test are the first rows of their streams."""
    max_caption_tokens: int = Field(48, ge=4)
    """Captions are cut to this many tokens (before the end-of-text token)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes. 0 loads in the training process, which is fastest for small images on few cores."""
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    """A run fails when more than this fraction of images cannot be read; fewer are skipped and counted."""
    max_pixels: int = Field(89_478_485, gt=0)
    """Images larger than this many pixels are refused before decoding (Pillow's own bomb limit)."""
    pixel_cache: bool = True
    """Keep each training image decoded and resized in `cache_dir/pixels`, so it is decoded once, not once per epoch."""
    pixel_cache_max_gb: float = Field(16.0, ge=0)
    """A split whose pixel cache would exceed this size is read without one."""


class OptimizerSettings(Strict):
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay, applied to matrices only (not to biases, norms or embeddings' scale)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas; 0.98 as in CLIP for stability with large contrastive batches."""
    eps: float = Field(1e-6, gt=0)
    """AdamW epsilon."""
    warmup: float = Field(0.05, ge=0, le=1)
    """Linear warmup, as a fraction of the phase's optimizer steps."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """The cosine schedule decays to lr × this ratio."""
    fused: bool = True
    """Use PyTorch's fused AdamW kernel on CUDA and CPU (one kernel for all parameters); false runs the plain loop."""


class EngineSettings(Strict):
    epochs: int = Field(10, ge=1)
    """Passes over the training data."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after at most this many optimizer steps (`epochs` still bounds the run): a budget of steps, for smoke runs or so that one recipe costs about the same on sources of any size. The schedule is planned for the shorter of the two."""
    batch_size: int = Field(64, ge=1)
    """Images per micro-batch (per process)."""
    grad_accum: int = Field(2, ge=1)
    """Micro-batches accumulated into one optimizer step."""
    clip_grad: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""
    patience: int | None = Field(3, ge=1)
    """Stop when the validation loss has not improved for this many validations; null disables early stopping."""
    log_every: int = Field(10, ge=1)
    """Write a training line to metrics.jsonl every this many optimizer steps."""
    output: Path = Path("runs/pretrain")
    """Run directory: config.yaml, metrics.jsonl and checkpoints/{best,last}."""
    resume: bool = False
    """Continue from the run directory's last checkpoint."""
    save_checkpoints: bool = True
    """Write `checkpoints/best` and `last`. Off only for runs that keep nothing (`capcli benchmark`)."""
    max_bad_steps: int = Field(0, ge=0)
    """Skip up to this many optimizer steps whose loss or gradients are not finite (the update is dropped, the step still counts) before stopping; 0 stops the run at the first."""


class RuntimeSettings(Strict):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to run: `auto` takes CUDA, then MPS, then the CPU."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision. `auto`: bf16 on CUDA (fp16 with loss scaling where bf16 is missing), fp32 elsewhere."""
    seed: int = 0
    """Seed of model initialisation and data order."""
    quiet: bool = False
    """Silence progress output on stderr."""
    log: Literal["jsonl", "tensorboard"] = "jsonl"
    """Training logs: `metrics.jsonl` always; `tensorboard` also writes TensorBoard event files in the run's `tensorboard/` (needs the tensorboard package)."""
    compile: bool = False
    """Compile each transformer block with `torch.compile` (minutes to compile, faster steps after; needs a C++ compiler on CPU)."""
    local_loss: bool = False
    """Under torchrun: each rank's contrastive loss covers its own pairs against all ranks' (less memory); default: the whole global batch, as one process would."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: less memory, about a third more compute."""


class PretrainSettings(Strict):
    engine: EngineSettings = EngineSettings()
    optimizer: OptimizerSettings = OptimizerSettings()
    contrastive_weight: float = Field(1.0, ge=0)
    """Weight of the symmetric InfoNCE loss."""
    caption_weight: float = Field(1.0, ge=0)
    """Weight of the captioning (language-model) loss."""
    concept_weight: float = Field(0.0, ge=0)
    """Weight of the concept loss: a head on the image features (`model.concept_source`) predicts which of `model.concept_words` each image shows. 0 leaves the model without the head."""
    token_dropout: float = Field(0.0, ge=0, lt=1)
    """Share of the caption's words that the decoder reads as the pad token in the captioning loss during training, their targets unchanged (word dropout, Bowman et al. 2016): it must then take more from the image and less from the words before."""

    @model_validator(mode="after")
    def _some_loss(self) -> PretrainSettings:
        if self.contrastive_weight == 0 and self.caption_weight == 0:
            raise ValueError("contrastive_weight and caption_weight cannot both be 0")
        return self


class PolicySettings(Strict):
    """On-policy pairs (`--preferences policy[:JUDGE]`): captions the model writes, judged, the better against the worse."""

    beams: int = Field(4, ge=0)
    """Beam-search candidates per image: the best `beams` captions of a search that wide."""
    samples: int = Field(4, ge=0)
    """Captions per image drawn by sampling at `temperature`."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the drawn captions."""
    min_gap: float = Field(0.5, ge=0)
    """Least judge-score difference between a pair's chosen and rejected caption (equal scores are never paired)."""
    per_image: int = Field(2, ge=1)
    """Most pairs per image: the best caption against the worst ones that are `min_gap` below it."""
    images: int | None = Field(2000, ge=1)
    """Training images drawn for in each round (a seeded choice); null: every training image."""
    use_references: bool = True
    """Let a reference caption be chosen where it scores above every caption the model wrote."""
    relation_credit: float = Field(0.0, ge=0)
    """What the grounding judge pays for each true relation a caption states, in objects covered (0.5: half an object), so that captions learn to say where things are."""
    corruption_pairs: int = Field(0, ge=0)
    """Also this many generated corruption pairs per training image (today's pairs), mixed in; 0 for none."""
    rounds: int = Field(1, ge=1)
    """Rounds of draw-then-train (iterative DPO): each round draws its pairs from the policy the last one left, and trains `align.engine`'s budget on them."""
    reference: Literal["start", "previous"] = "start"
    """The reference model of each round: the starting checkpoint throughout, or the policy at the start of that round."""


class AlignSettings(Strict):
    engine: EngineSettings = EngineSettings(epochs=5, batch_size=32, output=Path("runs/align"))
    optimizer: OptimizerSettings = OptimizerSettings(lr=3e-5)
    checkpoint: Path | None = None
    """Start from this checkpoint (or run directory). Default: the best pretrain checkpoint."""
    preferences: str | None = None
    """Preference pairs. Default: pairs generated from the pretrain data source."""
    pairs_per_image: int = Field(2, ge=1)
    """Generated pairs per training image, at most one per reference caption, each of a different corruption kind while the captions allow. Held-out images always get 2, so their scores compare across settings."""
    freeze_vision: bool = True
    """Keep the vision tower frozen (eval mode, no gradients, features cached)."""
    beta: float = Field(0.1, gt=0)
    """Bradley-Terry/DPO inverse temperature β."""
    margin: float = Field(0.1, ge=0)
    """Margin m in -log σ(β·Δr - m)."""
    alpha_init: float = Field(0.7, ge=0, le=1)
    """Weight of the contrastive loss at the first step; the preference loss gets 1 - α."""
    alpha_final: float = Field(0.3, ge=0, le=1)
    """Weight of the contrastive loss at the last step (linear in between)."""
    reference: Literal["checkpoint", "none"] = "checkpoint"
    """Reward baseline: the frozen starting checkpoint (DPO), or none (plain log-probabilities)."""
    length_normalize: bool = False
    """Use per-token mean log-probabilities as rewards."""
    lm_weight: float = Field(0.0, ge=0)
    """Optional LM loss on the chosen caption, to keep its likelihood from falling."""
    image_weight: float = Field(0.0, ge=0)
    """Weight of mDPO's image-conditional term: the chosen caption with its own image preferred over the same caption with another image, so that the reward cannot be won on the caption alone."""
    anchor_weight: float = Field(0.0, ge=0)
    """Weight of mDPO's anchor: −log σ(chosen reward), which keeps the chosen caption's reward above zero."""
    policy: PolicySettings = PolicySettings()
    """On-policy pairs and rounds; used with `--preferences policy[:JUDGE]`."""
    max_retrieval_drop: float = Field(0.05, ge=0, le=1)
    """Warn of an alignment tax when val image→text R@1 falls by more than this (absolute) during align."""


class BenchmarkSettings(Strict):
    steps: int = Field(6, ge=2)
    """Optimizer steps in each timed training run; the first one warms up and is not timed."""
    repeats: int = Field(3, ge=1)
    """Timed repeats of every figure, after one warm-up; the report gives their median and min-max."""
    images: int = Field(64, ge=1)
    """Test images captioned in each caption repeat (the naive baseline decodes the first batch)."""
    caption_batch: int = Field(16, ge=1)
    """Images decoded together, as `capcli caption --batch-size`."""
    metric_captions: int = Field(200, ge=1)
    """Captions scored in each metric-timing repeat."""
    caption_files: int = Field(1000, ge=1)
    """JPEGs (1024 × 768) the caption_files section writes and captions in each repeat."""
    matmul_size: int | None = Field(None, ge=64)
    """Side of the square matmul that measures the peak FLOP/s. Default: 2048 on CPU, 8192 on CUDA."""


class DecodeSettings(Strict):
    """Search controls of a caption, as transformers' `generate` takes them (`capcli caption`, `capcli evaluate`)."""

    model_config = ConfigDict(frozen=True)  # hashable: a search is a value, shared and cached by it

    beams: int = Field(1, ge=1)
    """Beam width; 1 is greedy search."""
    max_length: int = Field(32, ge=1)
    """At most N new tokens, end-of-text included."""
    min_length: int = Field(1, ge=0)
    """At least N caption tokens before end-of-text may be chosen."""
    length_penalty: float = Field(1.0, allow_inf_nan=False)
    """Beam search ranks finished captions by logprob / tokens^X; above 1 favours longer ones."""
    no_repeat_ngram: int = Field(0, ge=0)
    """Never repeat an n-gram of this size; 0 allows repeats."""
    concept_guidance: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Weight λ of the concept head's soft constraint: each concept word's score gains λ·log σ(its concept logit), so words the head does not see in the image are hard to say; 0 turns it off, and a model without a concept head ignores it."""
    concept_prior: float = Field(0.2, ge=0, le=1, allow_inf_nan=False)
    """With concept guidance and a checkpoint that records its concept slots: how much the decoder's own choice among the concept words of one slot (shapes, colours, sizes; objects, attributes) counts beside the concept head's. The decoder still decides when a word of a slot comes and in which form; 0 leaves the choice of word to the head alone, 1 renormalises the λ-weighted constraint within each slot. It applies whenever concept guidance is on (λ > 0): λ weights the head's terms, this the decoder's."""
    spatial_guidance: bool = True
    """With concept guidance and a head on the patches: after a spatial phrase ("left of", "above", …) the next object's words are scored by the patches on that side of the subject, so that a relation is stated the right way round."""

    @model_validator(mode="after")
    def _min_within_max(self) -> DecodeSettings:
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) cannot exceed max_length ({self.max_length})")
        return self


class CaptionSettings(Strict):
    """`capcli caption`: how images are decoded and their lines written."""

    format: Literal["text", "jsonl", "tsv"] = "text"
    """text: path<TAB>caption | tsv: a header line, then path, caption, score, logprob, tokens | jsonl: one JSON object per image with those keys."""
    batch_size: int = Field(16, ge=1)
    """Images decoded together; their lines are written and flushed after each batch."""
    workers: int = Field(0, ge=0)
    """Processes that read and resize the images while the model captions the batch before; 0: this process reads them between batches."""
    decode: DecodeSettings = DecodeSettings(beams=5)


class EvaluateSettings(Strict):
    """`capcli evaluate`: which split, how it is decoded, and what is written."""

    split: str = "test"
    """train | val | test | test_novel"""
    decode: DecodeSettings = DecodeSettings(beams=5)
    limit: int | None = Field(None, ge=1)
    """Evaluate the first N images of the split only; null: all of them."""
    baseline: Path | None = None
    """Checkpoint whose captions the win rate is against; null: shuffled captions."""
    save_captions: Path | None = None
    """Write one JSON line per image: image, caption, references, scores."""
    report: Path | None = None
    """Write DIR/index.html: each image with its caption, references, CIDEr-D, CLIP score and grounding errors, sortable, self-contained."""
    output: Path = Path("results/evaluation_metrics.json")
    """Where the results JSON is written."""
    batch_size: int = Field(64, ge=1)
    """Images decoded together."""
    resamples: int = Field(1000, ge=1)
    """Bootstrap resamples behind every 95% interval."""
    judge: str = "auto"
    """Who scores CLIP score and win rate: auto (open_clip ViT-B-32 openai if cached, else self) | self | open_clip[:TAG] | a ViT-B-32 weights FILE."""
    allow_train_images: bool = False
    """Score a held-out split even when it holds images the run trained on (refused otherwise, exit 2)."""


class Settings(Strict):
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    pretrain: PretrainSettings = PretrainSettings()
    align: AlignSettings = AlignSettings()
    benchmark: BenchmarkSettings = BenchmarkSettings()
    caption: CaptionSettings = CaptionSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
