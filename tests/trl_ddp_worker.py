"""Worker of the DDP test in tests/test_integrations_trl.py, launched by ``torchrun
--nproc_per_node 2`` on CPU (gloo): ``trl_ddp_worker.py {sft,distillation} OUT``.

Every process builds the same adapter (the same tiny models) and trains it two steps of two
micro-batches on its own share of the batches (the sampler's shard of the rows; in
distillation, the completions it samples for its share of the prompts), then saves its student
and projectors to ``OUT/rank{r}.pt``, with the number of all-reduces of the projectors'
gradients. DDP all-reduces the student's gradients and, through their own DDP wrapper, the
projectors': the processes must end with the same weights.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from training_helpers import EXAMPLES, make_tokenizer
from trl_helpers import PROMPTS, distillation_trainer, models, sft_trainer

import mta_kernels
from mta.unit_pool import UnitPool


def main(kind: str, out: str) -> None:
    tok = make_tokenizer([e.text for e in EXAMPLES], "bytelevel", 300)
    settings = {
        "ddp_backend": "gloo",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
    }
    with mta_kernels.prefer_reference(), UnitPool(processes=0) as units:
        if kind == "sft":
            trainer = sft_trainer(out, tok, *models(tok), **settings)
        else:
            # a generation batch is 2 processes × 2 rows × 2 micro-batches: 8 of the 12 prompts
            prompts = PROMPTS * 4
            trainer = distillation_trainer(out, tok, *models(tok), units, prompts, **settings)
        allreduces = []

        def counted_allreduce(state, bucket):
            allreduces.append(bucket.index())
            return allreduce_hook(state, bucket)

        trainer.projectors.register_comm_hook(None, counted_allreduce)
        trainer.train()
    weights = {
        f"student.{k}": v
        for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
    }
    weights |= {f"mta.{k}": v for k, v in trainer.mta_loss.state_dict().items()}
    weights["projector_allreduces"] = torch.tensor(allreduces)
    torch.save(weights, f"{out}/rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
