"""capcli: train, align, evaluate and serve an image captioner, from the command line or from Python.

``capcli.load(path)`` gives an :class:`~capcli.api.ImageCaptioner` (docs/python.md). The API is
imported on first use, so that ``capcli --version`` and ``--help`` answer at once.
"""

__version__ = "0.1.0"
__all__ = ["ImageCaptioner", "__version__", "load"]


def __getattr__(name: str):
    if name in ("load", "ImageCaptioner"):
        from capcli import api

        return getattr(api, name)
    raise AttributeError(f"module 'capcli' has no attribute {name!r}")
