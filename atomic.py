"""Outputs appear whole or not at all: files and folders are built under a temporary name next to
their final place and renamed into it.

Temporary files and folders are created with the modes a plain ``open()`` (0o666) or
``os.mkdir()`` (0o777) asks for, so the user's umask (and any default ACL of the folder) decides
their permissions exactly as for a file written directly; ``tempfile.mkstemp`` / ``mkdtemp`` would
leave them readable by their owner only.
"""
from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from config import InputError

_TRIES = 100


def _create_unique(folder: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """Create a new entry `folder/<prefix><random><suffix>` with `create`; retry on a name clash."""
    for _ in range(_TRIES):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{folder}: no free temporary name after {_TRIES} tries")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _new_folder(path: Path) -> None:
    os.mkdir(path, 0o777)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file name next to `path` (same folder, so the rename is atomic).

    When the block finishes, the temporary file is renamed onto `path`; when it raises, the
    temporary file is deleted and `path` keeps its old content. `suffix` lets writers that pick
    the format from the name (matplotlib, tifffile) see the right extension. The file exists (empty)
    when the block starts; writers that reopen it by name keep its umask-based mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_unique(path.parent, f".{path.name}.", suffix, _new_file)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_replaceable(path: Path, replace: bool) -> None:
    if not os.path.lexists(path):
        return
    if not replace:
        raise InputError(f"{path}: already exists; use --force to replace it")
    if path.is_symlink() or not path.is_dir():
        raise InputError(f"{path}: not a plain folder; remove it yourself")


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a new empty temporary folder next to `path` (`.<name>.tmp-XXXXXXXX`) to build it in.

    When the block finishes, the temporary folder is renamed to `path`. An existing `path` is an
    InputError unless `replace` is true; then it must be a plain folder, and it is moved aside, the
    new folder renamed in, and only then the old one deleted, so `path` is never missing and never
    half-written. When the block raises (or the rename fails), the temporary folder is deleted and
    `path` is left as it was. Dot-prefixed, the temporary folder is skipped by `list_samples`.
    """
    path = Path(path)
    _check_replaceable(path, replace)  # refuse before any work is done, and again at the end
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_unique(path.parent, f".{path.name}.tmp-", "", _new_folder)
    try:
        yield tmp
        _check_replaceable(path, replace)
        if os.path.lexists(path):
            # rename() may replace an empty folder: the old one goes there, out of the way
            aside = _create_unique(path.parent, f".{path.name}.old-", "", _new_folder)
            os.replace(path, aside)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.replace(aside, path)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def check_output_folders(source: str | os.PathLike, outputs: Sequence[str | os.PathLike],
                         force: bool) -> None:
    """Refuse output folders that would be written inside `source`, or whose replacement would
    delete it; an existing output needs `force` and must be a plain folder. InputError otherwise.

    For scripts that read a dataset folder and write new folders (split.py, crop.py), before any
    work is done; `atomic_dir` checks existence again when it renames.
    """
    src = Path(source).resolve()
    for out in map(Path, outputs):
        dst = out.resolve()
        if src.is_relative_to(dst):
            raise InputError(f"{out}: this output folder holds the source {source}; "
                             f"choose another output folder")
        if dst.is_relative_to(src):
            raise InputError(f"{out}: this output folder lies inside the source {source}; "
                             f"choose another output folder")
        _check_replaceable(out, force)
