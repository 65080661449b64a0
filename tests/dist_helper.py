"""Run under torchrun by tests: one optimizer step on this world size (gloo; FSDP2 or DeepSpeed when
world > 1; Ulysses groups of ``sp`` ranks), written by rank 0 as full tensors for comparison with a
single process taking the whole batch."""

import argparse

import torch

from prolong.recipe import load_recipe
from prolong.train.lm import TrainingLM
from prolong.model.load import load_model
from prolong.parallel.world import init_world, shutdown
from prolong.parallel.engine import build_engine
from prolong.parallel.dims import ParallelDims
from prolong.parallel.ulysses import build_group
from prolong.train.batch import collate, shard_batches
from prolong.train.trainer import Trainer
from tests.test_train import sample

# several documents per sequence; with L=32 some samples need SP=2 (a document > 16), [8]*4 and
# [2, 6, 8, 4, 4, 8] need neither SP=2 nor SP=4 (their documents are shared out whole)
LENGTHS = [[10, 22], [32], [3, 5, 24], [16, 16], [30, 2], [8] * 4, [2, 6, 8, 4, 4, 8], [1, 31]]


def main(args) -> None:
    """mode "grads": gradients of one step (FSDP2 only); "weights": the weights after one real step."""
    world = init_world()
    torch.manual_seed(0)
    lm = load_model(args.model_dir, rope_theta=8e6, dtype="float32")
    lora = ["stage1.lora.r=4", "eval_stage1.model_from=stage2", "stage2.init_from=model",
            "stage2.keep_optimizer_state=false"] if args.lora else []
    recipe = load_recipe("recipes/tiny.yaml", [*lora, f"stage1.activation_checkpointing={args.ac}", "stage1.seq_len=32",
                                               f"stage1.batch_tokens={len(LENGTHS) * 32}",
                                               f"stage1.micro_batch_size={args.micro_batch}",
                                               f"stage1.sequence_parallel={args.sp}",
                                               f"parallel.engine={args.engine}",
                                               f"parallel.zero_stage={args.zero_stage}"])
    cfg = recipe.train_stage("stage1")
    if args.lora:
        from prolong.model.lora import apply_lora

        apply_lora(lm, cfg.lora, torch.float32, "stage1.lora")
        with torch.no_grad():  # B starts at zero; give the adapters a value so every gradient is non-zero
            for name, p in lm.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
    sp = build_group(world, ParallelDims(world.world_size, args.sp)) if args.sp > 1 else None
    samples = [sample(i, lengths, sft=True) for i, lengths in enumerate(LENGTHS)]
    data_parallel = world.world_size // args.sp
    per_rank = len(samples) // data_parallel
    dp_rank = world.rank // args.sp  # the ranks of a sequence-parallel group read the same samples
    mine = samples[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    batches = [collate(mine[i:i + args.micro_batch]) for i in range(0, len(mine), args.micro_batch)]
    engine = build_engine(TrainingLM(lm, loss_chunk_size=16), cfg, recipe.parallel, world, torch.float32,
                          accumulation=len(batches))
    trainer = Trainer(engine, iter([]), cfg, world, accumulation=len(batches), callbacks=[])
    batches = list(shard_batches(batches, sp))  # the batch layer's job in training
    if args.mode == "grads":
        engine.optimizer.step = lambda *a, **k: None  # keep the gradients to compare them
        engine.optimizer.zero_grad = lambda *a, **k: None
    metrics = trainer.train_step(batches)
    grads = {}
    if args.mode == "grads":
        for name, p in engine.model.named_parameters():
            if not p.requires_grad:
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    else:
        grads = engine.full_state_dict(trainable_only=args.lora)
    if world.is_main:
        torch.save({"grads": grads, "loss": metrics["loss"], "targets": metrics["target_tokens"],
                    "tokens": metrics["tokens"], "grad_norm": metrics["grad_norm"]}, args.out)
    shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--ac", action="store_true")
    parser.add_argument("--engine", default="fsdp")
    parser.add_argument("--mode", default="grads", choices=["grads", "weights"])
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--lora", action="store_true")
    main(parser.parse_args())
