"""Atomic writes: the one home of "write under a temporary name, then rename into place".

A leaf module (standard library only, nothing from the package), so ``model/``, ``data/`` and ``modules/`` all use
it. What it guarantees, for a writer killed at any instruction (``kill -9``, power loss after the fsyncs):

* a **file** target (:func:`atomic_write` and its ``bytes`` / ``text`` / ``safetensors`` / ``torch.save`` forms,
  :class:`StagedFile`) holds either its previous content or the complete new one;
* a **directory** target (:func:`staged_directory`) is written in a staging sibling and swapped in with two
  renames; it is the complete old or the complete new directory. A death *between* the two renames leaves no
  directory at the target and the two halves beside it; :func:`recover_interrupted` (called by every later write
  and by the readers in ``model/checkpoint.py``) puts the complete new one in place, or says what to do.

Staging entries are siblings of their target named ``.<target>.<pid>.<host>.<random>.tmp`` (the old directory of a
swap: ``... .old``), where ``pid`` is the writer's process id and ``host`` a short hash of the machine's name. A
later write to the same target removes the entries left by writers that are no longer alive on this host (a killed
writer's 200 MB ``.tmp``), never a live writer's and never another host's (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "AtomicWriteError",
    "StagedFile",
    "atomic_save_safetensors",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_stale_staging",
    "clean_stale_staging_files",
    "default_mode",
    "default_permissions",
    "fsync_tree",
    "recover_interrupted",
    "replace_dir",
    "staged_directory",
    "staging_path",
]

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_STAGING = re.compile(r"(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})\.(?P<rand>[0-9a-f]{8})\.(?P<kind>tmp|old)")


# ---------------------------------------------------------------------------------------------------- permissions


def default_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` (0666) or ``mkdir`` (0777) gives under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def default_permissions(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything under it) the modes plain ``open``/``mkdir`` would (mkstemp
    and mkdtemp create 0600/0700 entries)."""
    path = Path(path)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in entries:
        if not p.is_symlink():
            os.chmod(p, default_mode(p.is_dir()))


# -------------------------------------------------------------------------------------------------------- staging


def _token() -> str:
    return f"{os.getpid()}.{_HOST}.{secrets.token_hex(4)}"


def staging_path(target: Path, kind: str = "tmp", token: str | None = None) -> Path:
    """``.<target>.<pid>.<host>.<random>.<kind>`` beside ``target`` (not created)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{token or _token()}.{kind}")


def _parse(target: Path, entry: Path) -> re.Match | None:
    prefix = f".{target.name}."
    if not entry.name.startswith(prefix):
        return None
    return _STAGING.fullmatch(entry.name[len(prefix) :])


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine may still be running (this process, one owned by another user, and
    any on Windows, where signal 0 is not a probe, count as alive): only provably dead owners lose their files."""
    if os.name == "nt" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _alive(pid: int, host: str) -> bool:
    """Whether the writer may still be running: another host's process counts as alive, so only entries provably
    left by a dead process on this machine are ever removed."""
    return host != _HOST or pid_alive(pid)


def _siblings(target: Path) -> list[tuple[Path, re.Match]]:
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    return sorted(((e, m) for e in entries if (m := _parse(target, e)) is not None), key=lambda t: t[0].name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_staging(target: Path) -> list[Path]:
    """Remove the staging siblings of ``target`` (``.tmp`` files/dirs, ``.old`` dirs) whose writer is dead.

    Call it only while ``target`` exists or has nothing to recover (see :func:`recover_interrupted`); the writers
    here do. Returns what was removed."""
    target = Path(target)
    removed = []
    for entry, m in _siblings(target):
        if not _alive(int(m["pid"]), m["host"]):
            _remove(entry)
            removed.append(entry)
    return removed


_ANY_STAGING_FILE = re.compile(r"\..+\.(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})\.(?P<rand>[0-9a-f]{8})\.tmp")


def clean_stale_staging_files(directory: Path) -> list[Path]:
    """Remove the staging *files* (``.<name>.<pid>.<host>.<random>.tmp``, any target name) of dead writers in
    ``directory``: a writer killed while writing ``best-step=8.ckpt`` leaves a file the size of a checkpoint that a
    later write of the same name would remove, but a resumed run may never write that name again. Directories
    (a swap's halves, which :func:`recover_interrupted` may still need) are left alone. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _ANY_STAGING_FILE.fullmatch(entry.name)
        if m is None or entry.is_symlink() or not entry.is_file() or _alive(int(m["pid"]), m["host"]):
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    return removed


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every regular file under ``path`` and the directories themselves to disk."""
    path = Path(path)
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


# ----------------------------------------------------------------------------------------------------------- files

# errno -> what the user can do about it
_STORAGE_ERRORS = {
    errno.ENOSPC: "free disk space there (or write elsewhere)",
    errno.EDQUOT: "free space within your disk quota there (or write elsewhere)",
    errno.EFBIG: "the file system refuses a file this large: write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "make the directory writable, or write elsewhere",
    errno.EPERM: "make the directory writable, or write elsewhere",
    errno.EIO: "check the disk (an I/O error), or write elsewhere",
}


_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


class AtomicWriteError(OSError):
    """A write the storage refused (full disk, quota, read-only or unwritable directory); the target is untouched
    and no staging entry is left. ``str()`` is one sentence naming the target, the reason and the fix."""

    def __str__(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else super().__str__()


_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def storage_error(target: Path, exc: BaseException, codes: Any = _STORAGE_ERRORS) -> AtomicWriteError | None:
    """``exc`` as an :class:`AtomicWriteError` about ``target`` when an ``OSError`` of the storage is ``exc`` or in its
    chain (torch.save reports a full disk as a ``RuntimeError`` whose context is the ``OSError``; safetensors as a
    ``SafetensorError`` naming the "os error"), else None. ``codes``: the errno values that count."""
    seen, e, code = set(), exc, None
    while e is not None and id(e) not in seen:
        if isinstance(e, AtomicWriteError):
            return e
        if isinstance(e, OSError) and e.errno in codes:
            code = e.errno
            break
        # safetensors (Rust) raises its own SafetensorError worded "... I/O error: <text> (os error 28)"
        m = _RUST_IO_ERROR.search(str(e)) if not isinstance(e, OSError) else None
        if m and int(m[1]) in codes:
            code = int(m[1])
            break
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    if code is None:
        return None
    name = errno.errorcode.get(code, str(code))
    kept = (
        f"the previous {target.name} is unchanged"
        if target.exists()
        else f"nothing was written under that name ({target.name} does not exist)"
    )
    message = (
        f"could not write {target}: {os.strerror(code)} ({name}); {kept} and nothing partial is left; "
        f"{_STORAGE_ERRORS[code]}"
    )
    return AtomicWriteError(code, message)


class StagedFile:
    """A new file at ``staging_path(target)``, created with the default mode; :meth:`commit` fsyncs it and renames
    it over ``target``, :meth:`discard` removes it. For writers that stream over time (the prediction writer);
    one-shot writes use :func:`atomic_write`."""

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(self.target)
        while True:
            self.path = staging_path(self.target)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            os.close(fd)
            break

    def commit(self) -> Path:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(self.path, default_mode())  # some writers (safetensors) create 0600 files
        os.replace(self.path, self.target)
        _fsync_dir(self.target.parent)
        return self.target

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def atomic_write(target: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(path)`` writes the content to ``path`` (a staging file beside ``target``, already created, empty);
    then it is fsynced and renamed over ``target``. On any error the staging file is removed and ``target`` is
    untouched; one the storage caused (full disk, quota, read-only or unwritable directory) is raised as
    :class:`AtomicWriteError`."""
    target = Path(target)
    try:
        staged = StagedFile(target)
    except OSError as e:
        error = storage_error(target, e)
        if error is None:
            raise
        raise error from e
    try:
        write(staged.path)
        return staged.commit()
    except BaseException as e:
        staged.discard()
        error = storage_error(target, e)
        if error is not None:
            raise error from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: Path(p).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata or {"format": "pt"}))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------- directories


def replace_dir(src: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move directory ``src`` to ``target``. An existing ``target`` is first renamed to its ``.old`` sibling (same
    token as ``src`` when ``src`` is a staging directory, so that :func:`recover_interrupted` knows the pair), then
    removed. Two renames: at every moment ``target`` is the complete old, the complete new, or absent with both
    beside it."""
    src, target = Path(src), Path(target)
    m = _parse(target, src) if src.parent == target.parent else None
    token = f"{m['pid']}.{m['host']}.{m['rand']}" if m else None
    if target.exists() or target.is_symlink():
        old = staging_path(target, "old", token)
        os.replace(target, old)
        os.replace(src, target)
        _fsync_dir(target.parent)
        _remove(old)
    else:
        os.replace(src, target)
        _fsync_dir(target.parent)


def _mkdir_staging(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = staging_path(target)
        try:
            path.mkdir()  # mode 0777 & ~umask: what a plain mkdir gives
            return path
        except FileExistsError:
            continue
        except PermissionError as e:
            raise AtomicWriteError(
                e.errno,
                f"cannot create the staging directory {path.name} beside {target} ({e.strerror}): a directory is "
                f"written next to its target and renamed into place; make {target.parent} writable or choose "
                "another directory",
            ) from None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry(old: Path, staged: Path, keep: Callable[[str], bool]) -> list[str]:
    """Hard-link (or copy) into ``staged`` the entries of ``old`` that ``staged`` lacks and ``keep`` accepts."""
    carried = []
    for entry in sorted(old.iterdir()):
        name = entry.name
        if (staged / name).exists() or (staged / name).is_symlink() or not keep(name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), staged / name)
        elif entry.is_dir():
            shutil.copytree(entry, staged / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(staged / name))
        carried.append(name)
    return carried


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, carry: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a new empty staging directory beside ``target`` to write into; on success what was written gets the
    default permissions, is fsynced and swapped in with :func:`replace_dir`; on any error it is removed (``target``
    untouched).

    ``carry(name)``: the top-level entries of an existing ``target`` that this write did not produce and ``carry``
    accepts are hard-linked (copied across filesystems) into the new directory before the swap, so files the
    writer does not own (a user's tokenizer.json) survive. Without ``carry`` the new directory replaces the old one
    whole. A symlink ``target`` is followed: the directory it points to is replaced."""
    target = Path(target)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    recover_interrupted(target)
    clean_stale_staging(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is a file, not a directory; remove it or choose another path")
    staged = _mkdir_staging(target)
    try:
        yield staged
        default_permissions(staged)  # some writers (safetensors) create 0600 files; not applied to carried ones
        if carry is not None and target.is_dir():
            _carry(target, staged, carry)
        fsync_tree(staged)
        replace_dir(staged, target)
    except BaseException as e:
        _remove(staged)
        error = storage_error(target, e, _SPACE_ERRORS)  # the writer's own reads may fail with EACCES: not ours
        if error is not None:
            raise error from e
        raise


# -------------------------------------------------------------------------------------------------------- recovery


def recover_interrupted(target: str | os.PathLike) -> str | None:
    """Finish or undo a directory swap into ``target`` whose writer died between its two renames.

    When ``target`` is absent and a dead writer's ``.old`` sibling is beside it: the writer's staging directory
    with the same token is complete (the old one is only moved aside once the new one is fully written), so it is
    renamed to ``target``; without it the old directory is moved back. Returns what was done (also warned), or None
    when there was nothing to recover. Raises ``FileExistsError`` (what happened + the command that fixes it) when
    the choice is not safe: a live writer, several candidates, or a rename that fails."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        return None
    entries = _siblings(target)
    olds = [(e, m) for e, m in entries if m["kind"] == "old"]
    if not olds:
        return None
    live = [(e, m) for e, m in olds if _alive(int(m["pid"]), m["host"])]
    if live:
        e, m = live[0]
        raise FileExistsError(
            f"{target} is being replaced right now by process {m['pid']} (its previous version is at {e.name}), or by "
            f"a process on another machine; retry when it has finished. If no such process exists any more, rename "
            f"the directory you want to keep to {target.name}"
        )
    if len(olds) > 1:
        names = ", ".join(e.name for e, _ in olds)
        raise FileExistsError(
            f"{target} is missing and several interrupted saves left directories beside it ({names}); rename the one "
            f"you want to {target.name} and remove the others"
        )
    old, m = olds[0]
    token = f"{m['pid']}.{m['host']}.{m['rand']}"
    new = staging_path(target, "tmp", token)
    source, what = (new, "the complete new version") if new.is_dir() else (old, "the previous version")
    try:
        os.replace(source, target)
    except OSError as e:
        raise FileExistsError(
            f"a save into {target} was interrupted (process {m['pid']} was killed while swapping directories); "
            f"{what} is at {source} but could not be renamed back ({e.strerror}): run  mv '{source}' '{target}'"
        ) from None
    _fsync_dir(target.parent)
    if source == new:
        _remove(old)
    msg = (
        f"a save into {target} was interrupted between its two renames (process {m['pid']} died); restored "
        f"{what} from {source.name}"
    )
    warnings.warn(msg, stacklevel=3)
    return msg
