"""Shared fixtures: a small synthetic dataset made once per session, and settings that train fast.

Everything runs on the CPU with no network: datasets' cache is pointed at a temporary
folder before anything imports it, and the hub is told to stay offline.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

_CACHE = Path(tempfile.mkdtemp(prefix="capcli-tests-"))
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)  # each session renders its data afresh
os.environ.setdefault("HF_DATASETS_CACHE", str(_CACHE / "hf-datasets"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
for key in [k for k in os.environ if k.startswith("CAPCLI_")]:  # a developer's own settings must not leak in
    del os.environ[key]

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from capcli.settings import Settings, load_settings, override  # noqa: E402
from capcli.train.sampler import IndexedDataset  # noqa: E402

# Under pytest-xdist (the default, see pyproject) every worker is a process of its own: one
# thread each, for the worker and for the capcli processes it starts, so that N workers share N
# cores instead of fighting over them (two 2-thread torch processes on 2 cores ran 20× slower).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL_SIZES = {"data.train_size": 64, "data.val_size": 16, "data.test_size": 16}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that take longest first, each file's tests in their order.

    xdist hands whole files to the workers in collection order (``--dist loadfile``); started
    last, a file of long end-to-end runs leaves the other worker idle at the end. A file's cost
    is the sum of its tests': ``slow(seconds=N)`` where a test says what it takes on a 2-core
    CPU, 10 for another ``slow`` test, 1 for the rest.
    """
    cost: dict[str, float] = {}
    for item in items:
        slow = item.get_closest_marker("slow")
        file = item.nodeid.split("::")[0]
        cost[file] = cost.get(file, 0) + (1 if slow is None else slow.kwargs.get("seconds", 10))
    items.sort(key=lambda item: -cost[item.nodeid.split("::")[0]])  # stable: within a file, the order stays


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header claims ``width × height``: a few bytes on disk, a bomb to decode."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    return bytes(data)


class SameCaptionEveryEpoch(IndexedDataset):
    """Each image with the caption of epoch 0 only: one batch really is the same batch every
    step, and a few steps teach image-dependent captions."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, key):
        return self.inner[(key[0], 0)]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the
    tiny model's ops are too small to share, and a second thread that waits on a busy CPU made such
    runs 40× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if report.failed:
        item.module.__dict__["_capcli_failed"] = True
    return report


@pytest.fixture(scope="module", autouse=True)
def _module_tmp_cleanup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Removes what a test file wrote under pytest's temporary folder once the file is done,
    unless one of its tests failed.

    Full-size models, their checkpoints and exports run to gigabytes; kept to the end of the
    session (pytest's default) they filled a CI machine's disk. The session's own cache lives
    outside this folder (``_CACHE``), so nothing a later file needs is removed.
    """
    root = tmp_path_factory.getbasetemp()
    before = set(root.iterdir())
    yield
    if request.module.__dict__.get("_capcli_failed"):
        return
    for path in set(root.iterdir()) - before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _one_meteor_jvm():
    """One METEOR JVM per test process, reused by every evaluation run in it (``keep_meteor``):
    starting one takes ~8 s of a 2-core CPU, and a dozen tests evaluate."""
    from capcli.metrics.captions import keep_meteor

    with keep_meteor():
        yield


@pytest.fixture(scope="session")
def data_cache() -> Path:
    """The session's cache root for materialised synthetic data."""
    return _CACHE / "data"


def make_settings(output: Path, cache: Path, **overrides) -> Settings:
    """Tiny-preset settings for a quick run: small data, small batches, no early stop, no accumulation."""
    cli = {
        **SMALL_SIZES,
        "data.cache_dir": cache,
        "pretrain.engine.output": output,
        "pretrain.engine.batch_size": 8,
        "pretrain.engine.grad_accum": 1,
        "pretrain.engine.epochs": 2,
        "pretrain.engine.log_every": 1,
        "runtime.device": "cpu",
        "runtime.quiet": True,
    }
    return override(load_settings(cli=cli, environ={}), overrides)


@pytest.fixture
def settings_factory(tmp_path: Path, data_cache: Path):
    """``settings_factory(name, **dotted_overrides)`` → Settings writing to ``tmp_path / name``."""

    def factory(name: str = "run", **overrides) -> Settings:
        return make_settings(tmp_path / name, data_cache, **overrides)

    return factory
