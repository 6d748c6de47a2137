"""``capcli benchmark``: measured speed and memory, each against a baseline timed in the same run.

- ``benchmark``: runs the sections (:func:`~capcli.bench.benchmark.run_benchmark`); data, metrics and on-policy pairs;
- ``measure``: the report, runs taking turns, seconds, peak memory and the peak matmul (MFU's denominator);
- ``training``: pretrain and align steps through ``engine.fit`` against their eager and uncached baselines;
- ``decoding``: KV-cache captions against the naive decoder, onnxruntime against PyTorch;
- ``flops``: model FLOPs of a step by formula, checked against a FLOP counter (MFU's numerator);
- ``peers``: capcli timed beside the peers, captioning and training (``--sections peers``);
- ``peer_models``: transformers' VisionEncoderDecoder and open_clip's CoCa at capcli's sizes;
- ``peer_captions``: captions by capcli and each peer, from image files, as each one's users write them;
- ``startup``: the cost of starting ``capcli`` against ``import torch``.
"""
