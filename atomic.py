"""Write files so that an interrupted run never leaves a half-written file where a good one was."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file name next to `path` (same folder, so the rename is atomic).

    When the block finishes, the temporary file is renamed onto `path`; when it raises, the
    temporary file is deleted and `path` keeps its old content. `suffix` lets writers that pick
    the format from the name (matplotlib, tifffile) see the right extension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
