"""One rank of the tensor-parallel logits check (tests/test_tensor_parallel.py starts one
process per rank): join a gloo group, load this rank's shard of each model dir through the
real loader, run a dense forward and write rank 0's gathered logits.

    python tests/tp_rank_logits.py RANK WORLD_SIZE PORT OUT_DIR MODEL_DIR...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    from llmctl.engine.distributed import Rendezvous, destroy_group, init_group
    from llmctl.layers.tensor_parallel import TensorParallel
    from llmctl.models.loader import load_model

    rank, world, port = (int(a) for a in sys.argv[1:4])
    out_dir, model_dirs = Path(sys.argv[4]), sys.argv[5:]
    torch.set_num_threads(1)
    tp = TensorParallel(rank, world)
    models = [load_model(d, "float32", "cpu", tp=tp) for d in model_dirs]  # every shard before joining
    init_group(tp, Rendezvous("127.0.0.1", port, world, external=True), torch.device("cpu"), 120)
    for i, model in enumerate(models):
        ids = load_file(Path(model_dirs[i]) / "inputs.safetensors")["input_ids"]  # [B, S]
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        with torch.inference_mode():
            hidden = model(ids, positions)
            logits = model.compute_logits(hidden.reshape(-1, hidden.shape[-1]))  # [B*S, V] on rank 0
        if rank == 0:
            save_file({"logits": logits.reshape(*ids.shape, -1).contiguous()}, out_dir / f"logits_{i}.safetensors")
    # Tear the group down before the interpreter does: gloo's threads outliving it end in std::terminate.
    torch.distributed.barrier()
    destroy_group()


if __name__ == "__main__":
    main()
    # Skip the interpreter's teardown: a gloo thread still ending there can call std::terminate
    # ("terminate called without an active exception", exit 134) after the logits are written,
    # about once in a full CPU run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
