"""Weight sync by collective broadcast: policy learner rank 0 -> rollout workers and reward learners.

The default path (``rollout.weight_sync: object_store``) puts the state dict in Ray's object store once and
every receiver fetches it. ``collective`` instead builds one stand-alone process group (its own TCP store,
not the learners' data-parallel group) over the sender and every receiver, NCCL on GPUs and gloo on CPUs,
and broadcasts tensor by tensor: no copy through host memory and the object store on GPU clusters, which
is how OpenRLHF and verl sync vLLM engines. The same code runs with gloo in the CPU tests.
"""

from __future__ import annotations

from datetime import timedelta

import torch


def make_group(master: str, rank: int, world: int, backend: str, timeout_s: float = 300.0):
    """Join the stand-alone broadcast group at ``master`` ("host:port"; rank 0 hosts the store)."""
    import torch.distributed as dist

    host, port = master.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), world, rank == 0, timedelta(seconds=timeout_s))
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world)
    raise ValueError(f"weight sync backend must be 'nccl' or 'gloo', got {backend!r}")


def spec_of(state: dict) -> list[tuple[str, tuple, str]]:
    """What receivers allocate: (name, shape, dtype) of every tensor, in broadcast order."""
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


def _broadcast(group, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def send(group, state: dict, device: str) -> None:
    """Broadcast every tensor of ``state`` from rank 0 (moved to ``device`` first: NCCL needs CUDA)."""
    for tensor in state.values():
        _broadcast(group, tensor.to(device).contiguous())


def receive(group, spec: list, device: str) -> dict:
    """The state dict broadcast by rank 0, on ``device``."""
    out = {}
    for name, shape, dtype in spec:
        out[name] = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        _broadcast(group, out[name])
    return out
