"""What the commands read and write on disk: checkpoint sources and output folders, checked before
any work so that a mistyped path gets a plain message and no file is lost."""

from __future__ import annotations

import os
from pathlib import Path


def checkpoint_source(name: str) -> str:
    """``name`` when it is an existing folder or could be a Hub model id ("name" or "org/name");
    FileNotFoundError for a path that does not exist (a Hub lookup would only call it a malformed
    id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise NotADirectoryError(f"{name}: a checkpoint is a folder, this is a file")
    looks_local = (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    )
    if looks_local or not name:
        raise FileNotFoundError(f"{name}: no such checkpoint folder")
    return name


def prepare_output_folder(path: Path, overwrite: bool) -> Path:
    """``path`` as a folder to write a model into: created if missing; FileExistsError if it is a
    file, or a folder holding files, unless ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{path} already holds files: choose an empty folder or pass --overwrite to replace them"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path
