"""Training, for every phase: the one loop (``engine.fit``) and what it stands on.

- ``engine``: the only training loop;
- ``contracts``: what a phase hands the loop (batch, objective, data) and what it gets back;
- ``state``: the loop's counters and the RNG states, as a checkpoint saves and restores them;
- ``validation``: the objective's means over a validation split, on all ranks;
- ``runner``: the objective as a module's forward, what DDP wraps;
- ``interrupt``: Ctrl-C and SIGTERM as a request to stop at the next safe point;
- ``runtime``: device, precision, autocast, grad scaler and process group, resolved once per command;
- ``precision``: the rules that resolve ``--precision``;
- ``checkpoint``: atomic checkpoint directories and what ``--resume`` starts from;
- ``card``: each checkpoint's ``config.yaml`` and model card;
- ``optim``: AdamW and the cosine schedule;
- ``sampler``: the data order as a function of (seed, epoch);
- ``distributed``: torchrun/DDP;
- ``runlog``: ``metrics.jsonl``;
- ``runlock``: one run per run directory;
- ``progress``: rich bars or plain lines.
"""
