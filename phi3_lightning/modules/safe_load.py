"""The one place this package unpickles a file: ``torch.load(..., weights_only=True)``, never anything else.

A Lightning ``.ckpt`` is a pickle. An unrestricted unpickler would let a crafted file run arbitrary code while it is
being read (a ``__reduce__`` that calls ``os.system``), so it is never used, not even as a fallback: a checkpoint
that holds Python objects the safe unpickler refuses is an error that says which global it wanted.

Checkpoints written by this package's ``fit`` hold tensors, numbers, strings, lists and dicts only (the
LightningModule stores its settings as plain data). The one extra global allowed is ``pathlib``'s path classes,
which a DataModule built in Python may keep in its hyper-parameters; constructing a path runs no user code.
Distributed (FSDP2) checkpoint directories are read through :func:`load_distributed`: torch's own reader unpickles
the ``.metadata`` file with plain ``pickle`` and the non-tensor items without ``weights_only``; ours unpickles
the metadata with an allowlist of torch's checkpoint-metadata classes and the items with ``weights_only=True``.

Every entry point that reads a ``.ckpt`` (``fit/validate/test/predict --ckpt_path`` through the checkpoint IO and
the FSDP2 strategy, ``generate``, ``export``, :func:`~phi3_lightning.modules.loading.load_head`) comes here.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SAFE_GLOBALS: tuple[type, ...] = (
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
)


class UnsafeCheckpointError(ValueError):
    """The file needs more than the safe unpickler allows (it may try to run code); it was not loaded."""


def _refused_global(error: BaseException) -> str | None:
    """The line of torch's weights-only refusal that names the global a pickle asked for (``Trying to load unsupported
    GLOBAL posix.system ...``), or None when the error is about something else (a corrupt or foreign file)."""
    for line in str(error).splitlines():
        low = line.lower()
        if "global" in low and ("unsupported" in low or "blocked" in low):
            return line.strip()
    return None


def _check_torch_file(path: Path) -> None:
    """A file given as a checkpoint must look like one written by ``torch.save`` (a zip archive, or the legacy
    pickle format) before it is handed to ``torch.load``; anything else (a README, a safetensors or JSON file of a
    Hugging Face directory) gets a one-line error instead of an unpickling traceback."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") or head.startswith(b"\x80"):  # zip (torch.save) / pickle protocol >= 2 (legacy)
        return
    what = "it is empty" if not head else f"it starts with {head!r}, not a torch.save zip archive"
    if path.suffix in (".safetensors", ".json") or path.name == "config.json":
        fix = f"for a Hugging Face checkpoint pass the directory that holds config.json ({path.parent})"
    else:
        fix = (
            "pass a .ckpt written by fit (e.g. logs/<run>/<backend>/version_0/checkpoints/last.ckpt) or a Hugging "
            "Face directory with config.json"
        )
    raise ValueError(f"{path} is not a Lightning checkpoint ({what}); {fix}")


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` (plus :data:`SAFE_GLOBALS`); clear errors for every bad file.

    Raises :class:`UnsafeCheckpointError` for a pickle that asks for other globals, ``ValueError`` for a file that
    is not a readable torch checkpoint (truncated, another format), ``FileNotFoundError`` when it does not exist.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory, not a checkpoint file: a distributed (FSDP2) checkpoint is read by the FSDP2 "
            "strategy (--config configs/strategies/fsdp2.yaml) or by generate / export, which take the directory"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    _check_torch_file(path)
    if mmap and not zipfile.is_zipfile(path):
        mmap = False  # torch's legacy (non-zip) format cannot be memory-mapped; it is read the same safe way
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        wanted = _refused_global(e)
        if wanted:
            raise UnsafeCheckpointError(
                f"{path} was not loaded: it holds Python objects that unpickling would import or call "
                f"({wanted}). phi3_lightning reads checkpoints only with torch.load(weights_only=True); a "
                "checkpoint written by `python -m phi3_lightning fit` never needs more. If you wrote this file yourself "
                "and trust it, re-save its tensors and plain settings (or convert the weights to safetensors)."
            ) from None
        detail = next(
            (ln.strip() for ln in reversed(text.splitlines()) if ln.strip() and "documentation" not in ln),
            type(e).__name__,
        )
        raise ValueError(f"{path} is not a torch checkpoint ({detail}); pass a .ckpt written by fit") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, AttributeError, KeyError, IndexError) as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} is not a readable torch checkpoint (truncated, still being written, or another format: "
            f"{type(e).__name__}: {first}); pass a .ckpt written by fit"
        ) from None


# ----------------------------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint directories
# ----------------------------------------------------------------------------------------------------------------------

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_ALLOWED = {
    _DCP_METADATA_MODULE: {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Plain pickle limited to the classes a ``torch.distributed.checkpoint`` ``.metadata`` file is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"the distributed checkpoint's metadata asks for {module}.{name}, which a checkpoint's metadata never "
            "holds; it was not loaded (phi3_lightning never unpickles arbitrary objects)"
        )


def _safe_reader_and_planner(path: Path):
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            meta_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(meta_path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                obj = torch.load(value, weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeFileSystemReader(str(path)), SafeLoadPlanner()


def _verify_dcp_metadata(path: Path) -> None:
    """Unpickle a distributed checkpoint's ``*.metadata`` with the allowlist (torch's loader wraps our refusal in an
    AssertionError among its other attempts, so it is checked here first, with a clear message)."""
    # the global index and the rank-local ones (``__<rank>.metadata``) that torch's reader also tries
    for dcp_meta in sorted(path.glob("*.metadata")):
        try:
            with open(dcp_meta, "rb") as f:
                _MetadataUnpickler(f).load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any other failure: not a readable checkpoint
            raise ValueError(
                f"{dcp_meta} is not a readable distributed-checkpoint index ({type(e).__name__}: {e})"
            ) from None


def load_distributed(state: dict[str, Any], path: str | Path) -> None:
    """``torch.distributed.checkpoint.load(state, path)`` without unsafe unpickling (see the module docstring)."""
    import torch.distributed.checkpoint as dcp

    _verify_dcp_metadata(Path(path))
    reader, planner = _safe_reader_and_planner(Path(path))
    try:
        dcp.load(state, storage_reader=reader, planner=planner)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path}: refused to unpickle part of the distributed checkpoint ({e})") from None
    except dcp.api.CheckpointException as e:  # errors on any rank arrive wrapped (a BaseException)
        causes = [pair[0] if isinstance(pair, tuple) else pair for pair in e.failures.values()]
        unsafe = [c for c in causes if isinstance(c, pickle.UnpicklingError)]
        if unsafe:
            wanted = _refused_global(unsafe[0]) or "a Python object"
            raise UnsafeCheckpointError(
                f"{path} was not loaded: an item of the distributed checkpoint holds Python "
                f"objects that unpickling would import or call ({wanted})"
            ) from None
        raise


@contextlib.contextmanager
def safe_lightning_distributed_load(module_name: str) -> Iterator[None]:
    """Within this block the Lightning strategy module ``module_name`` (``lightning.fabric.strategies.model_parallel``
    for ModelParallelStrategy, ``lightning.pytorch.strategies.fsdp`` for FSDP1) reads distributed checkpoints with
    :func:`load_distributed` instead of ``torch.distributed.checkpoint.load`` (which unpickles unsafely)."""
    import importlib

    module = importlib.import_module(module_name)
    name = "_distributed_checkpoint_load"
    original = getattr(module, name, None)
    if original is None:  # a Lightning release that reads differently: refuse rather than read unsafely
        raise RuntimeError(
            f"{module_name}.{name} is gone in this Lightning release; phi3_lightning cannot guarantee "
            "a safe distributed-checkpoint load"
        )
    setattr(module, name, load_distributed)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            yield
    finally:
        setattr(module, name, original)


def verify_checkpoint(path: str | Path) -> None:
    """Read a ``.ckpt`` file or a distributed checkpoint directory's metadata with the safe unpicklers only, so an
    unsafe or unreadable checkpoint is refused before any other reader (Lightning's, a strategy's) opens it."""
    path = Path(path)
    if path.is_dir():
        meta = path / "meta.pt"
        if meta.is_file():
            load_checkpoint_file(meta, mmap=True)
        _verify_dcp_metadata(path)
        return
    load_checkpoint_file(path, mmap=True)
