"""Data parallelism with torchrun on the CPU (gloo): equal to one process, resumable, never hanging.

The equivalence tests launch ``torchrun --standalone --nproc-per-node 2 -m capcli ...``
exactly as a user would, and compare its metrics log and weights with one process of the
whole batch: 2 processes × batch 4 must train the same model as 1 process × batch 8, within
float rounding of the gradient all-reduce.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from capcli.errors import ConfigError
from capcli.losses import contrastive_loss, local_contrastive_loss
from capcli.model import Captioner
from capcli.train.checkpoint import load_state
from capcli.train.runlog import read_metrics
from capcli.train.sampler import (
    StepBatchSampler,
    in_order,
    micro_batches_per_epoch,
    planned_rows,
    planned_steps,
)

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--train-size", "32", "--val-size", "8", "--test-size", "8", "--quiet", "--device", "cpu"]
TIMEOUT = 600  # a hang fails the test instead of the CI job


# ---------------------------------------------------------------- what each rank sees


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_of_batch_4_visit_what_one_process_of_batch_8_visits(accum: int) -> None:
    one = list(StepBatchSampler(50, 8, accum, seed=3, epoch=1))
    ranks = [list(StepBatchSampler(50, 4, accum, seed=3, epoch=1, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for b, whole in enumerate(one):
        assert ranks[0][b] + ranks[1][b] == whole  # rank 0 the first half, rank 1 the second: gather order
    resumed = list(StepBatchSampler(50, 4, accum, seed=3, epoch=1, skip_batches=2, rank=1, world=2))
    assert resumed == ranks[1][2:]


@pytest.mark.parametrize(("world", "accum", "steps"), [(1, 1, 3), (2, 2, 2), (2, 1, 5), (3, 2, 7)])
def test_planned_rows_are_the_rows_every_rank_takes_in_the_planned_steps(world: int, accum: int, steps: int) -> None:
    # 50 rows, batch 4 per rank: a step takes 4·world·accum rows, so 7 steps of 3 ranks × 2 span
    # two epochs (the engine's epochs restart the count of micro-batches, not of steps).
    n, per_epoch = 50, micro_batches_per_epoch(50, 4, accum, world) // accum
    taken: set[int] = set()
    epoch, left = 0, steps
    while left:
        batches = [list(StepBatchSampler(n, 4, accum, seed=3, epoch=epoch, rank=r, world=world)) for r in range(world)]
        take = min(left, per_epoch)
        taken |= {k.index for rank in batches for batch in rank[: take * accum] for k in batch}
        epoch, left = epoch + 1, left - take
    assert planned_rows(n, 4, accum, 3, steps, world) == sorted(taken)
    assert planned_steps(n, 4, accum, epochs=2, max_steps=None, world=world) == 2 * per_epoch
    assert planned_steps(n, 4, accum, epochs=2, max_steps=1, world=world) == 1


@pytest.mark.parametrize(("n", "world"), [(11, 3), (8, 2), (9, 2), (17, 2), (19, 3), (2, 2)])
def test_validation_shards_cover_every_row_once_in_equal_numbers_of_batches(n: int, world: int) -> None:
    shards = [in_order(n, 4, rank, world) for rank in range(world)]
    rows = sorted(key.index for shard in shards for batch in shard for key in batch)
    assert rows == list(range(n))
    assert len({len(shard) for shard in shards}) == 1  # a rank with fewer batches would hang the others
    assert all(batch for shard in shards for batch in shard)
    if n % (4 * world) == 0:  # whole global batches are one process's batches of 4·world
        assert [[k.index for k in b] for b in in_order(n, 4 * world)] == [
            [k.index for shard in shards for k in shard[g]] for g in range(len(shards[0]))]


def test_too_few_validation_rows_for_the_ranks_is_an_error() -> None:
    with pytest.raises(ValueError, match="1 rows cannot give each of 2 processes"):
        in_order(1, 4, 0, 2)


def test_local_losses_average_to_the_global_loss() -> None:
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    full = contrastive_loss(image, text, 14.3)
    halves = [local_contrastive_loss(image[r * 4 : r * 4 + 4], text[r * 4 : r * 4 + 4], image, text, r * 4, 14.3)
              for r in range(2)]
    assert_close((halves[0] + halves[1]) / 2, full)
    assert_close(local_contrastive_loss(image, text, image, text, 0, 14.3), full)  # one rank: the same loss


# ---------------------------------------------------------------- torchrun, end to end


def capcli(args: list[str], env: dict[str, str], nproc: int = 1, check: bool = True,
           torchrun: bool = False) -> subprocess.CompletedProcess:
    """``capcli ARGS`` in one plain process, or under ``torchrun --nproc-per-node N``."""
    launcher = [sys.executable, "-m", "capcli"] if nproc == 1 and not torchrun else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "capcli"]
    result = subprocess.run([*launcher, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def env(data_cache: Path) -> dict[str, str]:
    return {**os.environ, "CAPCLI_DATA__CACHE_DIR": str(data_cache), "CAPCLI_PRETRAIN__ENGINE__LOG_EVERY": "1",
            "CAPCLI_ALIGN__ENGINE__LOG_EVERY": "1", "OMP_NUM_THREADS": "1"}


def losses(run: Path, key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


def assert_same_run(a: Path, b: Path, keys: tuple[str, ...]) -> None:
    """Same steps, same logged losses, gradient norms and final weights, to float rounding.

    The gradient norm (logged before clipping) is compared as well: AdamW divides each update by
    the gradient's own scale, so a gradient summed over the ranks instead of averaged would leave
    the losses and weights equal and show only there."""
    for key in (*keys, "grad_norm"):
        got, expected = losses(b, key), losses(a, key)
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert_close([v for _, v in got], [v for _, v in expected], rtol=2e-4, atol=2e-5, msg=key)
    val_a = [r for r in read_metrics(a / "metrics.jsonl") if r["split"] == "val"]
    val_b = [r for r in read_metrics(b / "metrics.jsonl") if r["split"] == "val"]
    assert_close([r["val_loss"] for r in val_b], [r["val_loss"] for r in val_a], rtol=2e-4, atol=2e-5)
    wa = Captioner.from_pretrained(a / "checkpoints" / "last").state_dict()
    wb = Captioner.from_pretrained(b / "checkpoints" / "last").state_dict()
    for name in wa:
        assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, env) -> dict[str, Path]:
    """Pretrain, 2 epochs of 4 steps under torchrun: one process of batch 8 (the DDP path with
    nothing to split), and two of batch 4."""
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    capcli(["pretrain", *COMMON, "--epochs", "2", "--batch-size", "8", "--output", str(one)], env, torchrun=True)
    result = capcli(["pretrain", *COMMON, "--epochs", "2", "--batch-size", "4", "--output", str(two), "--json"],
                    env, nproc=2)
    return {"one": one, "two": two, "stdout": result.stdout, "root": root}


@pytest.mark.slow(seconds=40)
def test_pretrain_on_two_ranks_equals_one_process_of_the_whole_batch(pretrained) -> None:
    assert_same_run(pretrained["one"], pretrained["two"], ("loss", "contrastive_loss", "caption_loss"))
    assert [s for s, _ in losses(pretrained["two"])] == list(range(1, 9))


@pytest.mark.slow
def test_torchrun_with_one_process_runs_the_ddp_path(pretrained) -> None:
    """World size 1 under torchrun (the fixture's one process): DDP wrapping, gathers and
    reductions with nothing to split. It equals two ranks (above); the align test below holds a
    plain process against two ranks."""
    assert isinstance(load_state(pretrained["one"] / "checkpoints" / "last")["rng"], list)


@pytest.mark.slow
def test_rank_0_alone_writes_the_result_and_the_checkpoints(pretrained) -> None:
    summary = json.loads(pretrained["stdout"])  # one JSON document: rank 1 printed nothing
    assert summary["steps"] == 8 and summary["samples"] == 64
    names = {p.name for p in (pretrained["two"] / "checkpoints").iterdir()}
    assert names == {"best", "last"}
    state = load_state(pretrained["two"] / "checkpoints" / "last")
    assert isinstance(state["rng"], list) and len(state["rng"]) == 2  # each rank's RNG, for its resume
    weights = Captioner.from_pretrained(pretrained["two"] / "checkpoints" / "last").state_dict()
    assert not any(k.startswith(("module.", "model.")) for k in weights)  # DDP's wrapper was not saved


@pytest.mark.slow(seconds=40)
def test_align_with_local_loss_on_two_ranks_equals_one_plain_process_of_the_whole_batch(pretrained, env) -> None:
    """Align with accumulation 2: DDP syncs once per step (no_sync on the first micro-batch).

    The two ranks take ``--local-loss``: each rank's rows against all columns, so the mean of
    the ranks' contrastive losses is the global loss, and so is its gradient; what it saves is
    the (world·B)² logit matrix. (The pretrain runs above take the gathered loss.)"""
    start = pretrained["one"] / "checkpoints" / "best"
    args = ["align", *COMMON, "--checkpoint", str(start), "--epochs", "1", "--max-steps", "3"]
    one, two = pretrained["root"] / "align-one", pretrained["root"] / "align-two"
    capcli([*args, "--batch-size", "8", "--output", str(one)], env)
    capcli([*args, "--batch-size", "4", "--local-loss", "--output", str(two)], env, nproc=2)
    # reward_margin, not reward_accuracy: at step 1 the policy is the reference and every reward
    # is 0 up to rounding, so which pairs count as ties depends on the batch's padding width.
    assert_same_run(one, two, ("loss", "preference_loss", "contrastive_loss", "caption_loss", "reward_margin"))


@pytest.mark.slow(seconds=40)
def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_losses(pretrained, env) -> None:
    run = pretrained["root"] / "killed"
    args = ["pretrain", *COMMON, "--epochs", "2", "--batch-size", "4", "--output", str(run)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "capcli"]
    uninterrupted = pretrained["two"]  # the same command, run whole by the fixture
    job = subprocess.Popen([*launcher, *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    state = run / "checkpoints" / "last" / "state.pt"
    deadline = time.monotonic() + TIMEOUT
    while not state.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # torchrun starts each worker in a session of its own: kill them all, at once, with no chance to save.
    family = descendants(job.pid)
    for pid in [job.pid, *family]:
        os.kill(pid, signal.SIGKILL)
    job.wait()
    time.sleep(0.5)
    assert not [pid for pid in family if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    saved = load_state(run / "checkpoints" / "last")["step"]
    assert saved == 4, "the kill should land in epoch 2, after epoch 1's checkpoint"
    capcli([*args, "--resume"], env, nproc=2)
    assert [s for s, _ in losses(run)] == [s for s, _ in losses(uninterrupted)] == list(range(1, 9))
    assert_close([v for _, v in losses(run)], [v for _, v in losses(uninterrupted)], rtol=1e-6, atol=1e-7)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out.extend(children)
        todo.extend(children)
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_is_refused(pretrained, data_cache: Path, tmp_path: Path) -> None:
    """The two ranks' run, resumed by one process (in this one): refused before it trains."""
    from conftest import make_settings

    from capcli.phases import pretrain

    run = tmp_path / "two"
    shutil.copytree(pretrained["two"], run)
    settings = make_settings(run, data_cache, **{"data.train_size": 32, "data.val_size": 8, "data.test_size": 8,
                                                "pretrain.engine.batch_size": 4, "pretrain.engine.resume": True})
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\) and this run has 1"):
        pretrain(settings)
    assert losses(run) == losses(pretrained["two"])  # nothing trained, nothing logged


@pytest.mark.slow(seconds=17)
def test_a_failure_on_one_rank_stops_the_job_with_its_error(env, tmp_path: Path) -> None:
    """Rank 1 raises at step 2; rank 0 would wait for it in the all-reduce. torchrun stops both."""
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(
        "import os, sys\n"
        "from capcli.train import engine\n"
        "original = engine._Training._optimizer_step\n"
        "def failing(self, micro):\n"
        "    if os.environ['RANK'] == '1' and self.state.step == 1:\n"
        "        raise RuntimeError('rank 1 broke on purpose')\n"
        "    return original(self, micro)\n"
        "engine._Training._optimizer_step = failing\n"
        "from capcli.cli import main\n"
        "sys.argv[0] = 'capcli'\n"
        "main()\n", encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               "pretrain", *COMMON, "--epochs", "1", "--batch-size", "4", "--output", str(tmp_path / "run")]
    started = time.monotonic()
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    assert "rank 1 broke on purpose" in result.stderr
    assert time.monotonic() - started < 300  # stopped, not left to a collective timeout


@pytest.mark.slow(seconds=25)
def test_a_streamed_source_is_split_by_node_across_two_ranks(env, tmp_path: Path) -> None:
    """hf: --streaming under torchrun: each rank reads its shard of the stream
    (datasets.distributed.split_dataset_by_node), and an epoch is train_size samples in all."""
    from test_hub_sources import image_dataset

    root = tmp_path / "hf-data"
    (root / "data").mkdir(parents=True)
    image_dataset(24).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    image_dataset(6, start=100).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))
    run = tmp_path / "run"
    result = capcli(["pretrain", "--data", f"hf:{root}", "--streaming", "--train-size", "16", "--val-size", "4",
                     "--test-size", "0", "--batch-size", "4", "--epochs", "1", "--output", str(run), "--quiet",
                     "--json", "--device", "cpu"], env, nproc=2)
    # One epoch: datasets waits 5 s at the end of each streamed pass (apache/arrow#45214), and the
    # epochs after the first are test_hub_sources' (in one process, resumed mid-epoch).
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["epochs"] == 1 and summary["samples"] == 16
