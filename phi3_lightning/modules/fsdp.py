"""FSDP2 for the Phi-3 LightningModules: the data-parallel mesh, ``fully_shard`` per decoder layer + root, meta-device
materialisation of the shards, and pretrained weights broadcast from rank 0 into them.

``Phi3LightningModule.configure_model`` calls these when Lightning's ``ModelParallelStrategy`` (our
``FSDP2Strategy``) supplies a device mesh. The init step of materialisation (every module that owns tensors runs its
``reset_parameters()``) is the model layer's, shared with ``from_pretrained``
(:func:`phi3_lightning.model.checkpoint.reset_owned_parameters`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..model.checkpoint import reset_owned_parameters
from ..model.heads import Phi3PreTrainedHead


def data_parallel_mesh(mesh):
    """The mesh dimension FSDP2 shards over; a tensor-parallel dimension larger than 1 is refused."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy built a tensor-parallel mesh of size {mesh['tensor_parallel'].size()}, but the "
            "Phi-3 modules implement FSDP2 only; set tensor_parallel_size: 1 (the fsdp2 overlay uses "
            "phi3_lightning.modules.FSDP2Strategy, which does)"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard(head: Phi3PreTrainedHead, mesh) -> None:
    """``fully_shard`` every decoder layer, then the root (embedding, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    dp = data_parallel_mesh(mesh)
    for layer in head.model.layers:
        fully_shard(layer, mesh=dp)
    fully_shard(head, mesh=dp)


def materialize_meta(module: nn.Module, device: torch.device) -> None:
    """Give a meta-device (possibly FSDP2-sharded) module real storage on ``device`` and its init.

    The same recipe as Lightning's and torchtitan's: ``to_empty`` on the root, then every submodule that owns
    parameters or buffers runs its ``reset_parameters()``. Only ``module`` is touched (metric states are not).
    """
    module.to_empty(device=device)
    reset_owned_parameters(module)
    _zero_sharded_padding_rows(module)


@torch.no_grad()
def _zero_sharded_padding_rows(module: nn.Module) -> None:
    """``Embedding.reset_parameters`` zeroes the pad row with ``weight[pad].zero_()``; on an FSDP2-sharded DTensor
    that writes to a gathered temporary, not to the shard. Zero the row in the shard that holds it."""
    for m in module.modules():
        w = getattr(m, "weight", None)
        pad = getattr(m, "padding_idx", None)
        if not isinstance(m, nn.Embedding) or pad is None or not hasattr(w, "to_local"):
            continue
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        row = pad - offset[0]
        if 0 <= row < shape[0]:
            w.to_local()[row].zero_()


def broadcast_pretrained(head: Phi3PreTrainedHead, load_full: Callable[[], nn.Module] | None) -> None:
    """Rank 0 (the one given ``load_full``, which builds the full pretrained head on the CPU) reads the checkpoint;
    every rank receives its shards of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full: dict[str, torch.Tensor] = load_full().state_dict() if load_full is not None else {}
    set_model_state_dict(head, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
