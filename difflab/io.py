"""Files are written whole or not at all: every writer goes through ``atomic_path``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (os.replace), on error it is removed.

    The suffix is kept so writers that look at it (PIL, numpy) pick the right format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False):
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` by one rename, on error it is removed.

    An existing ``path`` that is not empty is refused (FileExistsError) unless ``replace``; it is then swapped out
    only once the new folder is whole, so a kill leaves the old folder or the new one, never half of either."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise FileExistsError(f"{path} exists and is not empty (--force replaces it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the mode mkdir would
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old / path.name, path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (hex), computed once per (path, size, modification time)."""
    st = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_tensor(path: str | os.PathLike | None, tag: dict[str, str], make, name: str = "x"):
    """The tensor ``name`` of the safetensors file ``path`` when its metadata holds ``tag``; else ``make()``,
    written there atomically with ``tag`` (a torn or foreign file is made again; no path: no cache)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    if path is not None and Path(path).exists():
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if all(meta.get(k) == v for k, v in tag.items()):
                    return f.get_tensor(name)
        except (SafetensorError, OSError):
            pass
    value = make()
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({name: value.contiguous()}, str(tmp), metadata=tag)
    return value
