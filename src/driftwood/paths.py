"""Where driftwood keeps what it builds: ``$DRIFTWOOD_CACHE``, else ``$XDG_CACHE_HOME/driftwood``
(``~/.cache/driftwood``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("DRIFTWOOD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "driftwood"
    )
    return Path(root)
