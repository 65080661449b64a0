"""Run under torchrun by tests: one optimizer step's gradients on this world size (gloo, FSDP2 when
world > 1), written by rank 0 as full tensors for comparison with a single process."""

import sys

import torch

from prolong.config import load_recipe
from prolong.model.lm import TrainingLM
from prolong.model.load import load_model
from prolong.parallel import init_world, parallelize, shutdown
from prolong.train.batch import collate
from prolong.train.main import build_optimizer
from prolong.train.schedule import build_scheduler
from prolong.train.trainer import Trainer
from tests.test_train import sample

LENGTHS = [[10, 22], [32], [3, 5, 24], [16, 16], [30, 2], [8] * 4, [32], [1, 31]]


def main(model_dir: str, out: str, micro_batch: int, activation_checkpointing: bool) -> None:
    world = init_world()
    torch.manual_seed(0)
    lm = load_model(model_dir, rope_theta=8e6, dtype="float32")
    model = parallelize(TrainingLM(lm, loss_chunk_size=16), world, activation_checkpointing=activation_checkpointing,
                        compile=False, param_dtype=torch.float32)
    cfg = load_recipe("recipes/tiny.yaml").stage1
    opt = build_optimizer(model, cfg)
    samples = [sample(i, lengths, sft=True) for i, lengths in enumerate(LENGTHS)]
    per_rank = len(samples) // world.world_size
    mine = samples[world.rank * per_rank:(world.rank + 1) * per_rank]
    batches = [collate(mine[i:i + micro_batch]) for i in range(0, len(mine), micro_batch)]
    trainer = Trainer(model, opt, build_scheduler(opt, 10, 0.1, 0.1), iter([]), cfg, world,
                      accumulation=len(batches), callbacks=[])
    opt.step = lambda *a, **k: None  # keep the gradients to compare them
    opt.zero_grad = lambda *a, **k: None
    metrics = trainer.train_step(batches)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    if world.is_main:
        torch.save({"grads": grads, "loss": metrics["loss"], "targets": metrics["target_tokens"]}, out)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "ac")
