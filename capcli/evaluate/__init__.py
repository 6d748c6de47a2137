"""``capcli evaluate`` and ``capcli report``: a checkpoint's captions scored, and runs drawn.

- ``evaluation``: decode a split, score it with every metric and a bootstrap interval, write the JSON;
- ``judge``: who scores CLIP score and the win rate (open_clip ViT-B/32 or the model itself);
- ``gallery``: the self-contained HTML page of images, captions and errors;
- ``report``: ``curves.png`` of one or more runs.

The metrics themselves are pure functions in ``capcli.metrics``.
"""
