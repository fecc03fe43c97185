"""Worker for test_moe_balance_ddp.py: train a small MoE GPT with aux-loss-free balancing for a few
steps under DDP (gloo), ``moe_update_bias`` after every optimizer step.

DDP is built with ``broadcast_buffers=False``, so the selection biases agree across ranks only
because ``moe_update_bias`` sums the load counts over the ranks before updating. Each rank takes
its contiguous half of every global batch; rank r saves its state dict to ``OUT/{tag}-rank{r}.pt``.
Usage: torchrun --nproc_per_node=2 _ddp_moe_balance_worker.py OUT
"""

import contextlib
import gc
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from leanscale.models import GPT, GPTConfig
from leanscale.sparse import (
    apply_expert_parallel,
    apply_moe,
    gathered_state_dict,
    moe_aux_loss,
    moe_global_batch,
    moe_update_bias,
)

GLOBAL_BATCH, SEQ, VOCAB, STEPS, MICRO = 8, 16, 64, 4, 2
SETTINGS = {
    # dropless, no balancing loss: 2 ranks on half batches equal one process on the whole batch
    "lossfree": {"load_balancing_coef": 0.0},
    # Qwen's global-batch loss: f_i over both ranks' tokens; under DDP's gradient averaging this
    # equals the batch loss of one process on the whole batch
    "global": {"load_balancing_coef": 0.01, "balance_loss": "global"},
    # expert parallelism (experts sharded over the 2 ranks), aux-loss-free as "lossfree"
    "expert_parallel": {"load_balancing_coef": 0.0},
    # the global-batch loss with MICRO gradient-accumulation micro-batches per rank inside
    # moe_global_batch: f_i over both ranks' micro-batches so far; equals one process whose
    # micro-batch j is both ranks' micro-batches j
    "global_accum": {"load_balancing_coef": 0.01, "balance_loss": "global"},
}


def data(step):
    g = torch.Generator().manual_seed(300 + step)
    idx = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def micro_batches(step, part):
    """Global batch ``step`` as MICRO micro-batches; ``part(j)``: the rows of micro-batch j."""
    x, y = data(step)
    return [(x[part(j)], y[part(j)]) for j in range(MICRO)]


def build(tag):
    torch.manual_seed(0)
    return apply_moe(GPT(GPTConfig(VOCAB, SEQ, n_layer=2, n_head=2, n_embd=16)), 4, every=1, top_k=2,
                     capacity_factor=None, bias_update_rate=0.05, **SETTINGS[tag])


def train(model, step_batches, wrap=None):
    net = model if wrap is None else wrap(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, y in step_batches:
        opt.zero_grad()
        _, loss = net(x, y)
        (loss + moe_aux_loss(model)).backward()
        opt.step()
        moe_update_bias(model)
    del net, opt
    gc.collect()


def train_accum(model, step_micro_batches, wrap=None):
    """As train, each step accumulated over its micro-batches inside moe_global_batch (DDP
    synchronises the last backward only); each micro-batch's loss divided by their number."""
    net = model if wrap is None else wrap(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for micro in step_micro_batches:
        opt.zero_grad()
        with moe_global_batch(net):
            for j, (x, y) in enumerate(micro):
                sync = net.no_sync() if j < len(micro) - 1 and hasattr(net, "no_sync") else contextlib.nullcontext()
                with sync:
                    _, loss = net(x, y)
                    ((loss + moe_aux_loss(model)) / len(micro)).backward()
        opt.step()
        moe_update_bias(model)
    del net, opt
    gc.collect()


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = GLOBAL_BATCH // world
    batches = [tuple(t[rank * local:(rank + 1) * local] for t in data(s)) for s in range(STEPS)]
    for tag in SETTINGS:
        model = build(tag)
        if tag == "expert_parallel":
            model = apply_expert_parallel(model)
        if tag == "global_accum":  # rank r's micro-batch j: rows r * local + j * m ... of the global batch
            m = local // MICRO
            steps = [micro_batches(s, lambda j: slice(rank * local + j * m, rank * local + (j + 1) * m))
                     for s in range(STEPS)]
            train_accum(model, steps, lambda m: DDP(m, broadcast_buffers=False))
        else:
            train(model, batches, lambda m: DDP(m, broadcast_buffers=False))
        state = gathered_state_dict(model) if tag == "expert_parallel" else model.state_dict()
        torch.save({k: v.detach().clone() for k, v in state.items()}, f"{out}/{tag}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
