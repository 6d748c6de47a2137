"""Fault injection: named points where the reliability tests kill the process or fail a write.

Off unless the environment variable ``_CAPCLI_FAULT`` names a point, so a user never meets
it (the leading underscore keeps it out of the ``CAPCLI_*`` settings namespace)::

    _CAPCLI_FAULT=POINT[@N][=ACTION]

- ``POINT``: one of ``POINTS`` below;
- ``N``: act the N-th time the point is reached in this process (default 1);
- ``ACTION``: ``kill`` (SIGKILL this process: nothing runs after it, as with ``kill -9``,
  the default), ``enospc`` or ``eacces`` (raise the ``OSError`` a full disk or a read-only
  folder raises).

The points sit where a kill or a failed write is most likely to lose data: each stage of
``save_checkpoint``, the pixel cache's first fill, align's feature cache, the results files.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "_CAPCLI_FAULT"
POINTS = (
    "checkpoint.start",  # a temporary folder exists, nothing written in it yet
    "checkpoint.weights",  # model files written, state.pt not yet
    "checkpoint.state",  # the new checkpoint complete in its temporary folder, before the renames
    "checkpoint.between",  # after the old checkpoint became .old-NAME, before the new one took its name
    "checkpoint.after",  # after both renames, before .old-NAME is removed
    "pixel_cache.create",  # the pixel cache's files about to be made (a full disk fails here)
    "pixel_cache.put",  # a row of the pixel cache written, not yet marked filled
    "caches.features",  # align: a batch of frozen-tower features computed
    "results.write",  # a results file (evaluate's JSON, --save-captions) about to be written
)
ACTIONS = ("kill", "enospc", "eacces")
_reached: dict[str, int] = {}


def point(name: str, path: object = None) -> None:
    """Mark a fault point; act when ``_CAPCLI_FAULT`` names it and its count is reached.

    ``path``: the file an injected ``OSError`` names, as the real one would.
    """
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, action = spec.partition("=")
    target, _, nth = where.partition("@")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(nth or 1):
        return
    action = action or "kill"
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = {"enospc": errno.ENOSPC, "eacces": errno.EACCES}.get(action)
    if code is None:
        raise ValueError(f"{ENV}: unknown action {action!r} (allowed: {', '.join(ACTIONS)})")
    raise OSError(code, os.strerror(code), str(path) if path is not None else None)


def reset() -> None:
    """Forget how often each point was reached (tests that inject in-process, one fault after another)."""
    _reached.clear()
