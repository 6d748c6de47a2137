"""The training phases: each wires settings, data, model and objective into ``engine.fit``.

Nothing here loops over data; a phase only decides *what* is trained (DESIGN §2).

- ``phase``: the run directory, ``config.yaml``, the curves, and ``Phase`` (what ``fit`` needs);
- ``pretraining``: phase 1, ``capcli pretrain``;
- ``alignment``: phase 2, ``capcli align``, with its rounds of on-policy pairs.
"""

from capcli.phases.alignment import (
    DEFAULT_START,
    DRAW_FILE,
    PAIRS_DIR,
    ROUND_FILE,
    ROUNDS_DIR,
    AlignPhase,
    AlignResult,
    AlignRound,
    align,
    policy_spec,
    prepare_align,
)
from capcli.phases.phase import Phase, prepare_run_dir
from capcli.phases.pretraining import (
    TOKENIZER_ROWS,
    concept_words_for,
    prepare_pretrain,
    pretrain,
)

__all__ = [
    "DEFAULT_START", "DRAW_FILE", "PAIRS_DIR", "ROUNDS_DIR", "ROUND_FILE", "TOKENIZER_ROWS", "AlignPhase",
    "AlignResult", "AlignRound", "Phase", "align", "concept_words_for", "policy_spec", "prepare_align",
    "prepare_pretrain", "prepare_run_dir", "pretrain",
]
