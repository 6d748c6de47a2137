"""Training, for every phase: the one loop (``engine.fit``) and what it stands on.

- ``engine``: the only training loop; ``runtime``: device, precision, autocast, grad scaler and
  process group, resolved once per command (``precision`` holds the resolution rules);
- ``checkpoint``: atomic checkpoint directories and what ``--resume`` starts from; ``card``: each
  checkpoint's ``config.yaml`` and model card;
- ``optim``: AdamW and the cosine schedule; ``sampler``: the data order as a function of (seed, epoch);
- ``distributed``: torchrun/DDP; ``runlog``: ``metrics.jsonl``; ``runlock``: one run per run directory;
  ``progress``: rich bars or plain lines.
"""
