"""Process-group setup and model wrapping for training: one process, DDP, or FSDP2 (`fully_shard` on a 1-D mesh).

Launch with `torchrun --nproc-per-node N ...`; the environment it sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) decides everything here. Backend: gloo on CPU, nccl on CUDA (config `distributed.backend`).

FSDP2 units: every LLM decoder layer, every ViT layer, the latent-to-pixel decoder and each flow-head stage get
their own `fully_shard`; the root holds the rest (tied embedding / LM head, projectors, gate, time embedder). Only
modules whose `forward` the model calls are sharded on their own (FSDP2 gathers parameters in forward hooks). The
frozen VAE is left out of sharding (`ignored_params`): every rank keeps a full copy, so latents can be computed
outside the model's forward (the latent cache).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from cheers.checkpoint import TIED_EMBED, TIED_HEAD, CheckpointError, read_tensor, tensor_files


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    strategy: str = "none"  # effective strategy

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(strategy: str, backend: str = "auto", device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group when launched by torchrun with more than one process."""
    world = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but CUDA is not available")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1:
        return DistInfo(0, 1, 0, dev, None, "none")
    if strategy == "none":
        raise RuntimeError(
            f"launched with {world} processes (WORLD_SIZE={world}) but distributed.strategy is 'none'; "
            "set distributed.strategy=ddp or distributed.strategy=fsdp2"
        )
    be = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(be, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, be, strategy)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Every rank reaches this point before any destroys its group: a rank tearing gloo down while its peer
        # still talks to it aborts the peer ("terminate called without an active exception").
        try:
            dist.barrier()
        except RuntimeError:  # the peer is already gone; nothing left to synchronise with
            pass
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (in place and returned). Gloo reduces CPU tensors; nccl needs them on the device."""
    if not info.distributed:
        return t
    if info.backend == "nccl":
        moved = t.to(info.device)
        dist.all_reduce(moved)
        t.copy_(moved.to(t.device))
    else:
        dist.all_reduce(t)
    return t


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap(model: nn.Module) -> nn.Module:
    """The CheersModel under a DDP wrapper (FSDP2 modifies the module in place, so it is returned as is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    m = model.model
    units: list[nn.Module] = list(m.language_model.layers)
    units += list(m.vision_representation.encoder.layers)
    units += [m.vae_decoder_projector, m.gen_projector, m.hi_projector]
    return units


def wrap(model: nn.Module, info: DistInfo, reshard_after_forward: bool = True, bf16: bool = False,
         init_dir: str | os.PathLike | None = None,
         init_extra: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Wrap a CheersModel for the effective strategy (no-op for a single process).

    FSDP2: `bf16` (CUDA only) computes in bfloat16 through a `MixedPrecisionPolicy` (float32 master weights and
    gradient reduction). A model built on the meta device (`init_dir` given) is sharded first and then filled
    from `init_dir` one tensor at a time, each rank keeping only its own shards (`load_sharded`): no rank ever
    holds the full float32 model. `init_extra` (name -> full tensor) fills the parameters the directory does not
    hold (a LoRA run's adapters)."""
    if not info.distributed:
        return model
    if info.strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=True,  # e.g. the ViT pooling head, or the LM head in a batch without labels
            **_no_buffer_sync(),  # the only buffers are the frozen latent statistics, identical on every rank
        )
    if info.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        ignored = set(model.model.vae_model.parameters())
        policy = MixedPrecisionPolicy()
        if bf16 and info.device.type == "cuda":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for unit in _fsdp_units(model):
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored,
                    mp_policy=policy)
        if init_dir is not None:
            model.to_empty(device=info.device)
            load_sharded(model, init_dir, init_extra)
        return model
    raise ValueError(f"unknown distributed strategy '{info.strategy}'")


def load_sharded(model: nn.Module, directory: str | os.PathLike,
                 extra: dict[str, torch.Tensor] | None = None) -> None:
    """Fill a sharded (FSDP2) model, materialized with `to_empty`, from an official weight directory: each tensor
    is read whole, one at a time, and each rank keeps its own shard of it (float32). `extra` (name -> full tensor)
    supplies parameters the directory does not hold; a LoRA-adapted layer reads its `base_layer` from the
    directory under the layer's own name."""
    owner = tensor_files(directory)
    tied = model.config.text.tie_word_embeddings
    extra = extra or {}
    with torch.no_grad():
        for name, target in list(model.named_parameters()) + list(model.named_buffers()):
            if name in extra:
                full = extra[name].clone()
            else:
                key = name.replace(".base_layer.", ".")
                key = TIED_EMBED if (key == TIED_HEAD and tied) else key
                if key not in owner:
                    raise CheckpointError(f"{directory}: no tensor '{key}' for the sharded load")
                full = read_tensor(owner[key], key)
            full = full.to(dtype=target.dtype if full.is_floating_point() else full.dtype)
            if isinstance(target, DTensor):
                shard = distribute_tensor(full.to(target.device), target.device_mesh, target.placements,
                                          src_data_rank=None)  # every rank has read the same tensor
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(full.to(target.device))
            del full
    if tied:
        head, embed = model.lm_head.weight, model.model.language_model.embed_tokens.weight
        if head is not embed:
            raise CheckpointError("the sharded model lost its tied output head (lm_head is not the embedding)")


def _no_buffer_sync() -> dict:
    """DDP keyword that stops the per-forward buffer broadcast (renamed in recent torch versions)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def wrap_plain(module: nn.Module, info: DistInfo) -> nn.Module:
    """DDP for a small module (stage-0 autoencoder); single process: unchanged."""
    if not info.distributed:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[info.device.index] if info.device.type == "cuda" else None, **_no_buffer_sync()
    )
