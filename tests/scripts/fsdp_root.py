"""Helper for tests/test_fsdp.py: which weights two FSDP2 processes (gloo) hold gathered after each phase.

Shards a tiny random Llama as the policy (`shard_model`) and a copy as the frozen KL reference, then records per
phase the bytes of gathered (whole, not DTensor) parameters of the root alone (embeddings, head, final norm) and of
the decoder blocks: after a training forward, after its backward, inside and after `unsharded` (generation), after
the next forward, and the reference's after its no-grad forward. Writes OUT/root-rank{r}.json.
Usage: python fsdp_root.py OUT
"""

import copy
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from kpo_lightning.models.char_tokenizer import build_char_tokenizer
from kpo_lightning.models.sharding import shard_model, unsharded
from kpo_lightning.models.tiny_models import build_tiny_random_model


def gathered_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of whole (gathered) parameters: the root's own and the blocks'."""
    out = {"root": 0, "blocks": 0}
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            out["blocks" if ".layers." in name else "root"] += p.numel() * p.element_size()
    return out


def worker(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = build_char_tokenizer()
    policy = build_tiny_random_model(tok, seed=0)
    reference = copy.deepcopy(policy).requires_grad_(False)
    whole_root = sum(p.numel() * 4 for n, p in policy.named_parameters() if ".layers." not in n)
    mesh = init_device_mesh("cpu", (world,))
    shard_model(policy, mesh, "32-true")
    shard_model(reference, mesh, "32-true", frozen=True)
    ids = torch.randint(5, len(tok), (2, 6), generator=torch.Generator().manual_seed(0))
    phases = {}
    loss = policy(input_ids=ids).logits.float().logsumexp(-1).mean()
    phases["after_forward"] = gathered_bytes(policy)
    loss.backward()
    phases["after_backward"] = gathered_bytes(policy)
    with torch.no_grad(), unsharded(policy):
        policy(input_ids=ids)
        phases["inside_unsharded"] = gathered_bytes(policy)
    phases["after_unsharded"] = gathered_bytes(policy)
    policy(input_ids=ids).logits.sum().backward()  # the next training step
    phases["next_forward_and_backward"] = gathered_bytes(policy)
    with torch.no_grad():
        policy(input_ids=ids)
    phases["next_no_grad_forward"] = gathered_bytes(policy)
    with torch.no_grad():
        reference(input_ids=ids)
    phases["reference_after_forward"] = gathered_bytes(reference)
    (out / f"root-rank{rank}.json").write_text(json.dumps({"whole_root_bytes": whole_root, **phases}))
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.spawn(worker, args=(2, free, Path(sys.argv[1])), nprocs=2)
