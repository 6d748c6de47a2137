"""Align (phase 2), tested by behaviour on the tiny model on CPU.

The frozen tower is bit-identical afterwards (and trained without the freeze), the caches
equal fresh computations, chosen and rejected share one forward pass, the reward metrics
reach metrics.jsonl, and the command's errors are one line with exit 2.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import datasets
import pytest
import torch
from torch.testing import assert_close
from typer.testing import CliRunner

from capcli.cli import app
from capcli.data.batches import PreferenceCollator, PreferenceDataset
from capcli.errors import TrainingInterrupted
from capcli.model import Captioner
from capcli.objectives import AlignObjective, score_pairs
from capcli.phases import align, prepare_align, pretrain
from capcli.settings import override
from capcli.train.engine import fit
from capcli.train.runlog import read_metrics
from capcli.train.sampler import SampleKey, StepBatchSampler

runner = CliRunner()


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory, data_cache) -> Path:
    """A briefly pretrained tiny model: the starting point (and reference) of every align here."""
    from conftest import make_settings

    settings = make_settings(tmp_path_factory.mktemp("align") / "pretrain", data_cache,
                             **{"pretrain.engine.max_steps": 6})
    return pretrain(settings).best_checkpoint


def align_settings(settings_factory, start: Path, name: str = "align", **overrides):
    return settings_factory(name, **{
        "align.checkpoint": start, "align.engine.output": settings_factory(name).pretrain.engine.output,
        "align.engine.batch_size": 8, "align.engine.grad_accum": 1, "align.engine.log_every": 1,
        "align.engine.max_steps": 3, "align.optimizer.lr": 1e-3, **overrides,
    })


def trained_rows(data: PreferenceDataset, k: int) -> list[int]:
    """k training pairs with reference log-probs: the cache holds those that the planned steps visit."""
    return (~torch.isnan(data.reference).all(dim=1)).nonzero().flatten().tolist()[:k]


def vision_state(model: Captioner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.vision.state_dict().items()}


def test_frozen_vision_is_bit_identical_after_align(settings_factory, start_checkpoint):
    settings = align_settings(settings_factory, start_checkpoint)
    result = align(settings)
    before = vision_state(Captioner.from_pretrained(start_checkpoint))
    after = Captioner.from_pretrained(result.fit.run_dir / "checkpoints" / "last")
    assert all(torch.equal(before[k], v) for k, v in after.vision.state_dict().items())
    trained = Captioner.from_pretrained(start_checkpoint).prefix_mapper.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in after.prefix_mapper.state_dict().items())


def test_unfrozen_vision_changes_during_align(settings_factory, start_checkpoint):
    settings = align_settings(settings_factory, start_checkpoint, **{"align.freeze_vision": False})
    result = align(settings)
    before = vision_state(Captioner.from_pretrained(start_checkpoint))
    after = Captioner.from_pretrained(result.fit.run_dir / "checkpoints" / "last").vision.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in after.items())


def test_frozen_tower_stays_in_eval_mode_and_has_no_gradients(start_checkpoint):
    model = Captioner.from_pretrained(start_checkpoint)
    model.freeze_vision()
    model.train()
    assert not model.vision.training and model.decoder.training
    assert not any(p.requires_grad for p in model.vision.parameters())


def test_cached_features_equal_a_fresh_forward_pass(settings_factory, start_checkpoint):
    phase = prepare_align(align_settings(settings_factory, start_checkpoint))
    data: PreferenceDataset = phase.data.train
    assert data.features is not None
    assert len(data.features) < len(data)  # two pairs per image share one tower pass
    model = phase.model.eval()
    rows = trained_rows(data, 4)
    fresh_data = PreferenceDataset(data.pairs, model.image_size, 10**8)
    pixels = torch.stack([fresh_data[SampleKey(i, 0)].pixels for i in rows])
    with torch.no_grad():
        fresh = model.image_features(pixels)
    cached = torch.stack([data[SampleKey(i, 0)].features for i in rows])
    assert_close(cached, fresh, rtol=1e-5, atol=1e-5)


def test_the_cache_holds_patch_tokens_and_a_cached_step_equals_one_through_the_tower(tmp_path_factory, data_cache,
                                                                                    settings_factory):
    """With the token prefix, the frozen tower's cache holds the pooled vector and the 64 patch
    tokens of each image, and align's losses and gradients from it equal those of a step that
    runs the tower on the pixels."""
    from conftest import make_settings

    start = pretrain(make_settings(tmp_path_factory.mktemp("tokens") / "pretrain", data_cache,
                                   **{"pretrain.engine.max_steps": 2, "model.prefix_mapper": "tokens"})).best_checkpoint
    phase = prepare_align(align_settings(settings_factory, start))
    data: PreferenceDataset = phase.data.train
    assert data.features.shape == (len(set(data.feature_index)), 65, 512)
    model, objective = phase.model.train(), phase.objective
    rows = trained_rows(data, 4)
    cached = phase.data.collate([data[SampleKey(i, 0)] for i in rows])
    through = phase.data.collate([PreferenceDataset(data.pairs, model.image_size, 10**8, reference=data.reference)
                                  [SampleKey(i, 0)] for i in rows])
    assert cached.pixels is None and through.features is None
    steps = []
    for batch in (cached, through):
        model.zero_grad(set_to_none=True)
        out = objective(model, batch, 0.5)
        sum(v for k, v in out.items() if k.endswith("_loss")).backward()
        steps.append(({k: v.detach() for k, v in out.items()},
                      {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (out_cached, grad_cached), (out_through, grad_through) = steps
    assert out_cached.keys() == out_through.keys()
    for key in out_cached:
        assert_close(out_cached[key], out_through[key], rtol=1e-4, atol=1e-5)
    assert grad_cached.keys() == grad_through.keys() and not any(n.startswith("vision.") for n in grad_cached)
    for name in grad_cached:
        assert_close(grad_cached[name], grad_through[name], rtol=1e-3, atol=1e-5)


def test_pairs_per_image_sets_the_training_pairs_and_leaves_the_held_out_ones(settings_factory, start_checkpoint):
    two = prepare_align(align_settings(settings_factory, start_checkpoint, **{"align.pairs_per_image": 2}))
    four = prepare_align(align_settings(settings_factory, start_checkpoint, "four", **{"align.pairs_per_image": 4}))
    assert len(four.data.train) == 2 * len(two.data.train)
    for column in ("chosen", "rejected", "corruption"):
        assert four.data.val.pairs[column] == two.data.val.pairs[column]


def test_cached_pair_logps_equal_the_starting_model(settings_factory, start_checkpoint):
    phase = prepare_align(align_settings(settings_factory, start_checkpoint))
    data: PreferenceDataset = phase.data.val
    reference = Captioner.from_pretrained(start_checkpoint).eval()
    collate = PreferenceCollator(reference.tokenizer, 48)
    rows = [0, 3, len(data) - 1]
    batch = collate([PreferenceDataset(data.pairs, reference.image_size, 10**8)[SampleKey(i, 0)] for i in rows])
    with torch.no_grad():
        chosen, rejected = score_pairs(reference, batch)
    assert_close(data.reference[rows], torch.stack([chosen, rejected], dim=1), rtol=1e-4, atol=1e-4)


def test_the_reference_cache_holds_the_training_pairs_the_planned_steps_visit(settings_factory, start_checkpoint):
    # 3 steps of 8 pairs: 24 of the training pairs have reference log-probs, and they are
    # exactly the ones the engine's sampler hands the 3 steps.
    phase = prepare_align(align_settings(settings_factory, start_checkpoint))
    data: PreferenceDataset = phase.data.train
    cached = (~torch.isnan(data.reference).all(dim=1)).nonzero().flatten().tolist()
    sampler = StepBatchSampler(len(data), 8, 1, phase.runtime.settings.seed, epoch=0)
    assert cached == sorted(k.index for batch in list(sampler)[:3] for k in batch)
    assert len(cached) == 24 < len(data)
    assert data[SampleKey(cached[0], 0)] is not None
    uncached = next(i for i in range(len(data)) if i not in cached)
    with pytest.raises(RuntimeError, match="no cached reference log-probs"):
        data[SampleKey(uncached, 0)]
    assert not torch.isnan(phase.data.val.reference).any()  # held-out pairs: all of them
    # Without the frozen-feature cache a micro-batch of unreadable images is skipped without a
    # step, so the engine may read past the plan: then every pair gets its reference.
    live = prepare_align(align_settings(settings_factory, start_checkpoint, "live", **{"align.freeze_vision": False}))
    assert not torch.isnan(live.data.train.reference).any()


def test_chosen_and_rejected_in_one_pass_equal_separate_passes(settings_factory, start_checkpoint):
    phase = prepare_align(align_settings(settings_factory, start_checkpoint))
    model, data = phase.model.eval(), phase.data.train
    batch = phase.data.collate([data[SampleKey(i, 0)] for i in trained_rows(data, 4)])
    with torch.no_grad():
        chosen, rejected = score_pairs(model, batch)
        features = batch.features
        for ids, mask, joint in ((batch.chosen_ids, batch.chosen_mask, chosen),
                                 (batch.rejected_ids, batch.rejected_mask, rejected)):
            logits = model.caption_logits(features, ids, mask)
            alone = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            assert_close(joint, (alone * mask).sum(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_captions_sharing_an_image_prefix_equal_each_with_its_own(settings_factory, start_checkpoint,
                                                                  checkpointing: bool):
    """caption_logits with ``image_of`` runs each image's prefix once for its captions: the logits
    and the gradients equal those of [prefix; caption] per caption. Under gradient checkpointing
    it takes the per-caption path (transformers keeps no cache there): equal too."""
    phase = prepare_align(align_settings(settings_factory, start_checkpoint))
    model, data = phase.model.train(), phase.data.train
    model.set_gradient_checkpointing(checkpointing)
    batch = phase.data.collate([data[SampleKey(i, 0)] for i in trained_rows(data, 3)])
    features = batch.features.float()
    ids = torch.cat([batch.chosen_ids[:, :8], batch.rejected_ids[:, :8], batch.chosen_ids[:2, :8]])
    mask = torch.cat([batch.chosen_mask[:, :8], batch.rejected_mask[:, :8], batch.chosen_mask[:2, :8]])
    image_of = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])  # the last two read other images than their own
    results = []
    for shared in (True, False):
        model.zero_grad()
        logits = (model.caption_logits(features, ids, mask, image_of) if shared
                  else model.caption_logits(features[image_of], ids, mask))
        (logits.float().pow(2).mean()).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (shared, shared_grads), (alone, alone_grads) = results
    assert shared.shape == (8, 8, alone.shape[-1])
    assert_close(shared, alone, rtol=1e-4, atol=1e-5)
    assert shared_grads.keys() == alone_grads.keys() and len(alone_grads) > 10
    for name, grad in alone_grads.items():
        assert_close(shared_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_captions_sharing_an_image_prefix_under_bf16_autocast_equal_each_with_its_own(settings_factory,
                                                                                      start_checkpoint):
    """Under autocast both paths feed the decoder the same dtypes (the prefix cast to the
    embeddings'), so they differ only by the rounding of their batches."""
    phase = prepare_align(align_settings(settings_factory, start_checkpoint))
    model, data = phase.model.eval(), phase.data.train
    batch = phase.data.collate([data[SampleKey(i, 0)] for i in trained_rows(data, 2)])
    w = min(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1])
    ids = torch.cat([batch.chosen_ids[:, :w], batch.rejected_ids[:, :w]])
    mask = torch.cat([batch.chosen_mask[:, :w], batch.rejected_mask[:, :w]])
    image_of = torch.tensor([0, 1, 0, 1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        shared = model.caption_logits(batch.features, ids, mask, image_of)
        alone = model.caption_logits(batch.features[image_of], ids, mask)
    assert shared.dtype == alone.dtype
    assert_close(shared.float(), alone.float(), rtol=0, atol=0.05)


def test_align_logs_reward_metrics_each_step_and_at_validation(settings_factory, start_checkpoint):
    result = align(align_settings(settings_factory, start_checkpoint))
    records = read_metrics(result.fit.run_dir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected", "alpha", "preference_loss",
                "contrastive_loss"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert train[0]["alpha"] == pytest.approx(0.7) and train[-1]["alpha"] == pytest.approx(0.7 - 0.4 * 2 / 3)
    assert val and all("val_reward_accuracy" in r and "val_preference_accuracy" in r for r in val)
    assert val[0]["val_reward_accuracy"] == pytest.approx(0.5)  # policy = reference: every reward ties at 0
    assert set(result.before) == set(result.after) == {
        "reward_accuracy", "preference_accuracy", "val_caption_loss", "retrieval_r1"}


class _Rows:
    """Images and captions that are their own row numbers, in the shape ``retrieval_r1`` reads."""

    def __init__(self, n: int):
        self.n, self.epochs = n, set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: SampleKey) -> int:
        self.epochs.add(key.epoch)
        return key.index

    def collate(self, rows: list[int]) -> _Batch:
        return _Batch(torch.tensor(rows))


class _Batch:
    """A caption batch of row numbers: the image is its row, the caption one token, the row again."""

    def __init__(self, rows: torch.Tensor):
        self.pixels, self.caption_ids, self.caption_mask = rows, rows[:, None], torch.ones(len(rows), 1)

    def __len__(self) -> int:
        return len(self.pixels)

    def to(self, device: torch.device) -> _Batch:
        return self


class _FixedEmbeddings(torch.nn.Module):
    """Image i embeds as the i-th unit vector and caption j as the j-th column of ``similarity``,
    so that image i · caption j = similarity[i, j]."""

    def __init__(self, similarity: torch.Tensor):
        super().__init__()
        self.similarity, self.modes = similarity, []

    def image_features(self, pixels):
        self.modes.append(self.training)
        return pixels

    def embed_image(self, rows):
        return torch.eye(len(self.similarity))[rows]

    def embed_text(self, ids, mask):
        return self.similarity.t()[ids[:, 0]]


def test_retrieval_r1_by_hand():
    """Rows are images, columns captions: image 0's best caption is its own (0.9), image 1's is
    caption 0 (0.8 > 0.5), image 2's its own (0.7): R@1 = 2/3. Caption→image would give 3/3 (each
    column's largest value is on the diagonal), so the direction is pinned down too. Batches of 2
    split the rows, and every image is scored against the captions of the other batch."""
    from capcli.phases.heldout import retrieval_r1
    from capcli.train.runtime import Runtime

    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.2], [0.1, 0.3, 0.7]])
    model, rows = _FixedEmbeddings(similarity).train(), _Rows(3)
    r1 = retrieval_r1(model, rows, rows.collate, Runtime(torch.device("cpu")), batch_size=2)
    assert r1 == pytest.approx(2 / 3)
    assert model.modes == [False, False] and model.training  # measured in eval mode, and put back
    assert rows.epochs == {0}  # each image's epoch-0 caption, the same every time


def test_text_only_pairs_train_the_decoder_without_an_image(start_checkpoint):
    model = Captioner.from_pretrained(start_checkpoint)
    pairs = datasets.Dataset.from_list([
        {"image": None, "chosen": "a helpful and correct answer", "rejected": "a rude answer"},
        {"image": None, "chosen": "thank you", "rejected": "no"},
    ])
    data = PreferenceDataset(pairs, model.image_size, 10**8, reference=torch.zeros(2, 2))
    batch = PreferenceCollator(model.tokenizer, 48)([data[SampleKey(i, 0)] for i in range(2)])
    out = AlignObjective()(model, batch, progress=0.0)
    assert "contrastive_loss" not in out
    out["preference_loss"].backward()
    # Not merely present: each token of both captions gets a gradient that moves its embedding.
    grad = model.decoder.transformer.wte.weight.grad
    tokens = [t for text in ("a helpful and correct answer", "a rude answer")
              for t in model.tokenizer.encode(" " + text, add_special_tokens=False)]
    assert grad is not None and bool((grad[tokens].abs().sum(dim=1) > 0).all())
    assert all(p.grad is None for p in model.vision.parameters())


def test_ablation_config_switches_the_preference_term_off(settings_factory, start_checkpoint):
    from capcli.settings import config_path, load_settings

    settings = load_settings(config_path("ablation.yaml"), {}, environ={})
    assert settings.align.alpha_init == settings.align.alpha_final == 1.0
    phase = prepare_align(align_settings(settings_factory, start_checkpoint, **{
        "align.alpha_init": settings.align.alpha_init, "align.alpha_final": settings.align.alpha_final}))
    batch = phase.data.collate([phase.data.train[SampleKey(i, 0)] for i in trained_rows(phase.data.train, 4)])
    out = phase.objective(phase.model, batch, progress=0.5)
    assert float(out["preference_loss"].detach()) == 0.0 and float(out["contrastive_loss"].detach()) > 0


def test_resumed_align_repeats_the_uninterrupted_run(settings_factory, start_checkpoint):
    """Ctrl-C after step 2 of 4, then --resume: the caches are rebuilt from the starting
    checkpoint, the weights come from the run's last one, and the losses repeat."""
    whole = align_settings(settings_factory, start_checkpoint, "whole", **{"align.engine.max_steps": 4})
    align(whole)
    parted = align_settings(settings_factory, start_checkpoint, "parted", **{"align.engine.max_steps": 4})
    with pytest.raises(TrainingInterrupted):
        align(parted, on_step=lambda step, _: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None)
    resumed = override(parted, {"align.engine.resume": True})
    phase = prepare_align(resumed)
    fit(phase.model, phase.objective, phase.data, resumed.align.engine, resumed.align.optimizer, phase.runtime)

    def losses(run: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]

    expected, got = losses(whole.align.engine.output), losses(parted.align.engine.output)
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3, 4]
    assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expected]), rtol=1e-5, atol=1e-6)


# --- the command -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_align_command_defaults_to_runs_pretrain_and_prints_before_after(tmp_path, data_cache, start_checkpoint,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    import shutil

    shutil.copytree(start_checkpoint, tmp_path / "runs" / "pretrain" / "checkpoints" / "best")
    env = {"CAPCLI_DATA__CACHE_DIR": str(data_cache), "CAPCLI_RUNTIME__DEVICE": "cpu"}
    result = runner.invoke(app, ["align", "--max-steps", "2", "--batch-size", "8", "--train-size", "32",
                                 "--val-size", "8", "--test-size", "8", "--quiet", "--json"], env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["phase"] == "align" and summary["steps"] == 2
    assert Path(summary["start_checkpoint"]) == Path("runs/pretrain/checkpoints/best")
    assert set(summary["before"]) == set(summary["after"])
    assert (tmp_path / "runs" / "align" / "checkpoints" / "best" / "model.safetensors").is_file()
    assert "pairs kept" in result.stderr


def test_align_without_a_pretrain_checkpoint_exits_2(tmp_path, monkeypatch, data_cache):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["align", "--max-steps", "1"], env={"CAPCLI_DATA__CACHE_DIR": str(data_cache)})
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: no checkpoint at runs/pretrain")
    assert "Traceback" not in result.output


def test_align_with_an_unknown_preference_source_exits_2(tmp_path, data_cache, start_checkpoint):
    result = runner.invoke(app, ["align", "--checkpoint", str(start_checkpoint), "--preferences", "csv:x",
                                 "--output", str(tmp_path / "a"), "--train-size", "32", "--val-size", "8"],
                           env={"CAPCLI_DATA__CACHE_DIR": str(data_cache)})
    assert result.exit_code == 2, result.output
    assert "unknown preference source 'csv:x'" in result.stderr


def test_alignment_tax_warns_when_retrieval_falls(settings_factory, start_checkpoint, monkeypatch, capsys):
    """R@1 measured 0.50 before and 0.30 after: a drop of 0.2 > 0.05 warns, on stderr and in the result."""
    import capcli.phases.alignment

    measured = iter([{"retrieval_r1": 0.5}, {"retrieval_r1": 0.3}])
    monkeypatch.setattr(capcli.phases.alignment, "heldout_metrics", lambda *args, **kwargs: next(measured))
    result = align(align_settings(settings_factory, start_checkpoint, **{"align.engine.max_steps": 1}))
    assert result.retrieval_drop == pytest.approx(0.2)
    assert result.tax_warning and "alignment tax" in result.tax_warning
    assert "warning: alignment tax" in capsys.readouterr().err


def test_align_on_a_jsonl_preference_file_with_a_missing_image(tmp_path, data_cache, start_checkpoint):
    """User pairs: images beside the file, one missing (dropped and counted), val carved from train."""
    from PIL import Image

    lines = []
    for i, colour in enumerate(["red", "blue", "green", "yellow"] * 6):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "chosen": f"a {colour} square", "rejected": "a purple star"})
    lines.append({"image": "missing.png", "chosen": "a red square", "rejected": "a blue circle"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["align", "--checkpoint", str(start_checkpoint), "--preferences",
                                 f"jsonl:{tmp_path / 'pairs.jsonl'}", "--output", str(tmp_path / "run"),
                                 "--max-steps", "2", "--batch-size", "4", "--train-size", "32", "--val-size", "8",
                                 "--quiet", "--json"],
                           env={"CAPCLI_DATA__CACHE_DIR": str(data_cache), "CAPCLI_RUNTIME__DEVICE": "cpu",
                                "CAPCLI_ALIGN__ENGINE__GRAD_ACCUM": "1"})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and "1 dropped (1 missing image)" in summary["pairs"]
    assert 0.0 <= summary["after"]["reward_accuracy"] <= 1.0
