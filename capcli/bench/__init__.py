"""``capcli benchmark``: measured speed and memory, each against a baseline timed in the same run.

- ``flops``: model FLOPs of a step by formula, checked against a FLOP counter (MFU's numerator);
- ``peers``: transformers' VisionEncoderDecoder and open_clip's CoCa at capcli's sizes;
- ``startup``: the cost of starting ``capcli`` against ``import torch``.
"""
