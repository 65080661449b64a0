"""Run under torchrun by tests: one optimizer step's gradients on this world size (gloo, FSDP2 when
world > 1), written by rank 0 as full tensors for comparison with a single process."""

import sys

import torch

from prolong.config import load_recipe
from prolong.model.lm import TrainingLM
from prolong.model.load import load_model
from prolong.parallel import init_world, shutdown
from prolong.parallel.engine import build_engine
from prolong.train.batch import collate
from prolong.train.trainer import Trainer
from tests.test_train import sample

LENGTHS = [[10, 22], [32], [3, 5, 24], [16, 16], [30, 2], [8] * 4, [32], [1, 31]]


def main(model_dir: str, out: str, micro_batch: int, activation_checkpointing: bool, engine_name: str,
         mode: str) -> None:
    """mode "grads": gradients of one step (FSDP2 only); "weights": the weights after one real step."""
    world = init_world()
    torch.manual_seed(0)
    lm = load_model(model_dir, rope_theta=8e6, dtype="float32")
    recipe = load_recipe("recipes/tiny.yaml", [f"stage1.activation_checkpointing={activation_checkpointing}", "stage1.seq_len=32",
                                               f"stage1.batch_tokens={len(LENGTHS) * 32}",
                                               f"stage1.micro_batch_size={micro_batch}",
                                               f"parallel.engine={engine_name}", "parallel.zero_stage=3"])
    cfg = recipe.stage1
    engine = build_engine(TrainingLM(lm, loss_chunk_size=16), cfg, recipe.parallel, world, torch.float32)
    samples = [sample(i, lengths, sft=True) for i, lengths in enumerate(LENGTHS)]
    per_rank = len(samples) // world.world_size
    mine = samples[world.rank * per_rank:(world.rank + 1) * per_rank]
    batches = [collate(mine[i:i + micro_batch]) for i in range(0, len(mine), micro_batch)]
    trainer = Trainer(engine, iter([]), cfg, world, accumulation=len(batches), callbacks=[])
    if mode == "grads":
        engine.optimizer.step = lambda *a, **k: None  # keep the gradients to compare them
        engine.optimizer.zero_grad = lambda *a, **k: None
    metrics = trainer.train_step(batches)
    grads = {}
    if mode == "grads":
        for name, p in engine.model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    else:
        grads = engine.full_state_dict()
    if world.is_main:
        torch.save({"grads": grads, "loss": metrics["loss"], "targets": metrics["target_tokens"],
                    "grad_norm": metrics["grad_norm"]}, out)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "ac", sys.argv[5], sys.argv[6])
