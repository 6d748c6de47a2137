"""Caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (DESIGN §6).

Text is PTB-tokenized first, by pycocoevalcap's ``PTBTokenizer`` (Java) when a ``java`` is
on PATH, otherwise by ``simple_ptb_tokenize``, a pure-Python copy tested against the jar;
the tokenizer used is recorded. METEOR also needs Java; without it METEOR is skipped and
the reason recorded. SPICE is not computed: it needs a Stanford CoreNLP model download.

Java failing at run time (a broken JRE, a read-only install, a crash, a hang) never
raises: tokenization falls back to Python and METEOR is skipped, each with a notice in the
result. Only an explicit ``tokenizer="ptb"`` turns a missing or broken Java into an error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from capcli.errors import CapcliError
from capcli.metrics.bootstrap import bootstrap_interval, resample_counts
from capcli.metrics.ptb import simple_ptb_tokenize

__all__ = [
    "METRICS",
    "CaptionScores",
    "caption_intervals",
    "caption_metrics",
    "corpus_bleu",
    "java_available",
    "simple_ptb_tokenize",
    "tokenize",
]

K = TypeVar("K", bound=Hashable)

METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d")
"""Result keys, in report order."""

TOKENIZERS = ("auto", "ptb", "python")
METEOR_TIMEOUT_S = 600.0
"""The METEOR jar is killed after this long; COCO's 5000 images take well under a minute."""

_BLEU_N = 4
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BleuScorer guards against 0/0 with these; kept for equality
_LINE_BREAKS = re.compile(r"\r\n|[\r\n\u2028\u2029\x0b\x0c\x85]")  # what the jar splits lines on


class _JavaFailure(Exception):
    """Java was found but did not do its job; the message says how."""


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (PTBTokenizer and METEOR need one)."""
    return shutil.which("java") is not None


@dataclass(frozen=True)
class CaptionScores:
    """Corpus and per-image caption metrics of one evaluated set.

    CIDEr-D's document frequencies come from the evaluated set's references, so its value
    depends on that set: report the split beside ``n``.
    """

    corpus: dict[str, float]  # metric → corpus value, in METRICS order, skipped ones absent
    per_image: dict[str, np.ndarray]  # metric → (n,) scores aligned with ``keys``
    keys: list[Any]  # image keys, in the order of the references mapping
    tokenizer: str  # "ptb" (the Java jar) or "python" (simple_ptb_tokenize)
    skipped: dict[str, str] = field(default_factory=dict)  # metric → why it was not computed
    notes: list[str] = field(default_factory=list)  # other notices, e.g. a Java fallback
    bleu_stats: np.ndarray = field(default_factory=lambda: np.zeros((0, 2 + 2 * _BLEU_N)))
    """(n, 10) per-image BLEU counts: test length, closest reference length, guessed 1..4-grams,
    clipped matching 1..4-grams. Corpus BLEU is ``corpus_bleu`` of their sum."""

    @property
    def n(self) -> int:
        """The number of images scored."""
        return len(self.keys)

    def summary(self) -> dict[str, Any]:
        """The JSON-able part: corpus values, n, tokenizer, skipped metrics and notes."""
        return {"n": self.n, "tokenizer": self.tokenizer, "metrics": dict(self.corpus),
                "skipped": dict(self.skipped), "notes": list(self.notes)}


# --- tokenization ---------------------------------------------------------------------


@contextmanager
def _stderr_captured() -> Iterator[Any]:
    """Point file descriptor 2 at a temporary file, so that a child JVM's chatter lands there.

    PTBTokenizer lets Java inherit our stderr, where it prints a timing line on every call
    (and its errors). The file is handed back for the error message when Java fails.
    """
    with tempfile.TemporaryFile(mode="w+b") as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(captured.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _last_line(captured: Any) -> str:
    captured.seek(0)
    lines = [line.strip() for line in captured.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _ptb_java(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """pycocoevalcap's PTBTokenizer, with its output checked line by line against the input.

    Line breaks inside a caption become spaces (the jar would split the caption in two and
    shift every later caption onto the wrong image), and an empty caption is appended: the
    jar tokenizes the last line of its input, which has no newline, differently from the
    others (``you're`` → ``you ` re`` instead of ``you 're``).
    """
    keys = [k for k, caps in captions.items() if caps]  # PTBTokenizer would drop the others
    if not keys:
        return {k: [] for k in captions}
    lines = {i: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in captions[k]] for i, k in enumerate(keys)}
    lines[len(keys)] = [{"caption": ""}]
    try:
        with _stderr_captured() as err:
            out = PTBTokenizer().tokenize(lines)
            for i, k in enumerate(keys):
                got = out.get(i, [])
                if len(got) != len(captions[k]):
                    raise _JavaFailure(f"it returned {len(got)} lines for {len(captions[k])} captions "
                                       f"({_last_line(err)})")
                for raw, tokens in zip(captions[k], got):
                    if not tokens and any(ch.isascii() and ch.isalnum() for ch in raw):  # PTB keeps those
                        raise _JavaFailure(f"it returned an empty line for {raw!r} ({_last_line(err)})")
    except (OSError, ValueError, subprocess.SubprocessError) as exc:  # no java process, temp file, decoding
        raise _JavaFailure(f"{type(exc).__name__}: {exc}") from exc
    position = {k: i for i, k in enumerate(keys)}
    return {k: (out[position[k]] if k in position else []) for k in captions}


def _tokenize(captions: Mapping[K, Sequence[str]], tokenizer: str) -> tuple[dict[K, list[str]], str, str | None]:
    """``tokenize`` that also returns the notice of a Java fallback (None when there was none)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer != "python":
        if not java_available():
            if tokenizer == "ptb":
                raise CapcliError("tokenizer 'ptb' needs Java, and no 'java' is on PATH; install a JRE "
                                  "or use the 'python' tokenizer")
        else:
            try:
                return _ptb_java(captions), "ptb", None
            except _JavaFailure as exc:
                if tokenizer == "ptb":
                    raise CapcliError(f"PTBTokenizer (Java) failed: {exc}") from exc
                notice = f"PTBTokenizer (Java) failed, so captions were tokenized in Python: {exc}"
                return _python_tokenize(captions), "python", notice
    return _python_tokenize(captions), "python", None


def _python_tokenize(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    return {k: [simple_ptb_tokenize(c) for c in caps] for k, caps in captions.items()}


def tokenize(captions: Mapping[K, Sequence[str]], tokenizer: str = "auto") -> tuple[dict[K, list[str]], str]:
    """PTB-tokenize captions as pycocoevalcap does: lowercased, punctuation dropped.

    Args:
        captions: image key → its captions.
        tokenizer: "ptb" runs the Java PTBTokenizer (an error without a working Java),
            "python" runs ``simple_ptb_tokenize``, and "auto" runs Java when it is on PATH
            and falls back to Python, with a RuntimeWarning, if Java fails.

    Returns:
        (image key → tokenized captions joined by single spaces, the tokenizer used:
        "ptb" or "python").
    """
    tokens, name, notice = _tokenize(captions, tokenizer)
    if notice:
        warnings.warn(notice, RuntimeWarning, stacklevel=2)
    return tokens, name


# --- metrics --------------------------------------------------------------------------


class _Meteor(Meteor):
    """pycocoevalcap's METEOR wrapper with an explicit, idempotent ``close``.

    Its own ``__del__`` takes a lock that ``compute_score`` never releases when it raises,
    so after a Java failure it would hang the garbage collector; and when the JVM fails to
    start it raises AttributeError there. ``close`` needs no lock.
    """

    def __init__(self) -> None:
        self.meteor_p: subprocess.Popen[bytes] | None = None
        super().__init__()  # starts the JVM

    def close(self) -> None:
        proc, self.meteor_p = self.meteor_p, None
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if pipe:
                    pipe.close()
            except OSError:  # a dead JVM leaves unflushed input behind: nothing to save
                pass
        proc.kill()
        proc.wait()

    def __del__(self) -> None:
        self.close()


_kept: _Meteor | None = None  # the JVM reused by every call inside ``keep_meteor``
_keeping = 0


@contextmanager
def keep_meteor() -> Iterator[None]:
    """Inside the block, METEOR's JVM is started at most once and reused by every
    ``caption_metrics`` call; it is shut down when the block ends.

    Starting the jar and loading its tables takes about 8 s of a 2-core CPU, each time. Outside
    such a block every call starts its own and shuts it down afterwards, so no 2 GB JVM outlives
    the call; a process that scores many times (the test suite, a sweep through the Python API)
    pays the start once. A JVM that failed is never reused.
    """
    global _keeping, _kept
    _keeping += 1
    try:
        yield
    finally:
        _keeping -= 1
        if not _keeping and _kept is not None:
            _kept.close()
            _kept = None


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, np.ndarray]:
    """Corpus and per-image METEOR 1.5 from the jar, shut down afterwards unless ``keep_meteor`` keeps it.

    The corpus value is the jar's aggregate over all images' match statistics, not the
    mean of the per-image scores.
    """
    global _kept
    if _kept is not None and (_kept.meteor_p is None or _kept.meteor_p.poll() is not None):
        _kept.close()  # it died since the last call: its pipes go, another is started
        _kept = None
    meteor = _kept
    if meteor is None:
        try:
            meteor = _Meteor()
        except OSError as exc:
            raise _JavaFailure(f"{type(exc).__name__}: {exc}") from exc
        if _keeping:
            _kept = meteor
    proc = meteor.meteor_p
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()  # unblocks the wrapper's readline(), which then fails to parse ''

    watchdog = threading.Timer(METEOR_TIMEOUT_S, kill)
    watchdog.start()
    failed = True
    try:
        score, scores = meteor.compute_score(gts, res)
        failed = False
    except (OSError, ValueError) as exc:
        if timed_out.is_set():
            raise _JavaFailure(f"METEOR took longer than {METEOR_TIMEOUT_S:.0f} s and was stopped") from exc
        stderr = proc.stderr.read().decode("utf-8", "replace").strip().splitlines() if proc.poll() is not None else []
        raise _JavaFailure(f"{type(exc).__name__}: {exc}" + (f" ({stderr[-1]})" if stderr else "")) from exc
    finally:
        watchdog.cancel()
        if failed and meteor is _kept:
            _kept = None  # a JVM that failed is not reused
        if meteor is not _kept:
            meteor.close()
    return float(score), np.asarray(scores, dtype=np.float64)


def bleu_statistics(gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]]) -> np.ndarray:
    """Per-image BLEU counts, (n, 10), as pycocoevalcap's BleuScorer collects them.

    Columns: test length, the reference length closest to it (the shorter one on a tie),
    guessed 1..4-grams, clipped matching 1..4-grams. Rows follow ``gts``'s key order.
    """
    rows = []
    for key, refs in gts.items():
        cooked = cook_test(res[key][0], cook_refs(refs, n=_BLEU_N), eff="closest", n=_BLEU_N)
        rows.append([cooked["testlen"], cooked["reflen"], *cooked["guess"], *cooked["correct"]])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2 + 2 * _BLEU_N)


def corpus_bleu(stats: np.ndarray) -> np.ndarray:
    """BLEU-1..4 from summed counts, exactly as pycocoevalcap computes them: (..., 10) → (..., 4).

    Geometric mean of the modified n-gram precisions up to n, times the brevity penalty
    exp(1 - r/c) when the candidates are shorter than the closest references (Papineni et
    al. 2002). Vectorised over leading axes, so it also gives per-image BLEU (one row per
    image) or one corpus value per bootstrap resample.
    """
    stats = np.asarray(stats, dtype=np.float64)
    testlen, reflen = stats[..., 0], stats[..., 1]
    guess, correct = stats[..., 2:2 + _BLEU_N], stats[..., 2 + _BLEU_N:]
    precisions = (correct + _TINY) / (guess + _SMALL)
    bleu = np.cumprod(precisions, axis=-1) ** (1.0 / np.arange(1, _BLEU_N + 1))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    brevity = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    return bleu * brevity[..., None]


def _check_inputs(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> None:
    if not references:
        raise ValueError("caption_metrics: no images to score")
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        raise ValueError(f"caption_metrics: {len(missing)} images without a prediction "
                         f"{missing[:3]}, {len(extra)} predictions without references {extra[:3]}")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"caption_metrics: image {key!r} needs a non-empty list of reference captions")
        if not isinstance(predictions[key], str):
            raise TypeError(f"caption_metrics: the prediction for {key!r} must be one string")


def caption_metrics(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    tokenizer: str = "auto",
) -> CaptionScores:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of one caption per image against its references.

    Corpus values are pycocoevalcap's: BLEU from n-gram counts summed over images (Papineni
    et al. 2002), METEOR 1.5 (Denkowski & Lavie 2014), ROUGE-L with β = 1.2 (Lin 2004) and
    CIDEr-D, which is what pycocoevalcap's ``Cider`` computes: σ = 6 length penalty, clipped
    counts, ×10 (Vedantam et al. 2015). Per-image scores come with them; ROUGE-L's and
    CIDEr-D's corpus values are the means of theirs, BLEU's and METEOR's are not.

    Args:
        predictions: image key → the generated caption.
        references: image key → its reference captions (at least one each). Its key order
            is the order of ``keys`` and of every per-image array.
        tokenizer: "auto", "ptb" or "python"; see ``tokenize``.

    Returns:
        CaptionScores. Without Java, METEOR is in ``skipped`` rather than ``corpus``.
    """
    _check_inputs(predictions, references)
    keys = list(references)
    joined = {i: [*references[k], predictions[k]] for i, k in enumerate(keys)}  # one JVM start for all
    tokens, tokenizer_used, notice = _tokenize(joined, tokenizer)
    gts = {i: tokens[i][:-1] for i in range(len(keys))}
    res = {i: tokens[i][-1:] for i in range(len(keys))}
    notes = [notice] if notice else []

    corpus: dict[str, float] = {}
    per_image: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    bleu, bleu_per_image = Bleu(_BLEU_N).compute_score(gts, res, verbose=0)  # verbose=1 prints to stdout
    for k in range(_BLEU_N):  # per-image BLEU arrives as 4 lists (one per n) of n_images scores
        corpus[f"bleu_{k + 1}"] = float(bleu[k])
        per_image[f"bleu_{k + 1}"] = np.asarray(bleu_per_image[k], dtype=np.float64)
    if not java_available():
        skipped["meteor"] = "METEOR needs Java, and no 'java' is on PATH"
    else:
        try:
            corpus["meteor"], per_image["meteor"] = _meteor(gts, res)
        except _JavaFailure as exc:
            skipped["meteor"] = f"METEOR (Java) failed: {exc}"
    for name, scorer in (("rouge_l", Rouge()), ("cider_d", Cider())):
        score, scores = scorer.compute_score(gts, res)
        corpus[name], per_image[name] = float(score), np.asarray(scores, dtype=np.float64)
    return CaptionScores(corpus=corpus, per_image=per_image, keys=keys, tokenizer=tokenizer_used,
                         skipped=skipped, notes=notes, bleu_stats=bleu_statistics(gts, res))


def caption_intervals(
    scores: CaptionScores, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over images for every computed caption metric.

    What each resample recomputes:

    - BLEU-1..4: corpus BLEU from the resampled images' n-gram counts, summed, so the
      brevity penalty and the precisions are corpus-level as in the point estimate.
    - ROUGE-L: the mean of per-image scores, which is exactly how its corpus value is made.
    - CIDEr-D: the mean of per-image scores with the document frequencies fixed from the
      full set (recomputing them on a resample with duplicated images would inflate them).
    - METEOR: the mean of per-image scores, shifted by the gap between the jar's corpus
      value (which pools match statistics) and that mean, so that the interval is around
      the reported value rather than next to it.

    Every metric uses the same resamples (one seed), so the intervals are paired.
    """
    stats = scores.bleu_stats

    def bleu_statistic(k: int):
        return lambda idx: corpus_bleu(resample_counts(idx, scores.n) @ stats)[:, k]

    intervals = {}
    for name in scores.corpus:
        if name.startswith("bleu_"):
            data = bleu_statistic(int(name[-1]) - 1)
        else:
            data = scores.per_image[name]
        low, high = bootstrap_interval(data, n_resamples, confidence, seed, n=scores.n)
        if name == "meteor":
            shift = scores.corpus[name] - float(np.mean(data))
            low, high = low + shift, high + shift
        intervals[name] = (low, high)
    return intervals
