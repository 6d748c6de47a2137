"""Captions at scale and exports: ``capcli caption`` over files, folders and lists
(``captioning``), and ``capcli export`` to ONNX (``export``).

The public entry points stay at the top of the package: ``capcli.api`` (``capcli.load``) and
``capcli.serving`` (ONNX captions without torch).
"""
