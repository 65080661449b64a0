"""Ulysses sequence parallelism: how a sample is shared by a group, and (slow, gloo) that SP = 2 and
4 give the loss and gradients of one process on the same batch."""

import pytest
import torch

from prolong.recipe import load_recipe
from prolong.errors import ConfigError
from prolong.pipeline import RunContext, publish_recipe, run_stage
from prolong.parallel.dims import ParallelDims
from prolong.parallel.ulysses import (SequenceParallel, check_model_heads, document_groups, kv_expansion,
                                      needs_sequence_parallel)
from prolong.store import Store
from prolong.train.batch import collate
from tests.conftest import FAST, ROOT
from tests.test_distributed import grads_on
from tests.test_train import sample


def shards(lengths: list[int], sp: int):
    mb = collate([sample(0, lengths, sft=True)])
    return mb, [mb.shard(SequenceParallel(group=None, size=sp, rank=r)) for r in range(sp)]


def test_a_sample_whose_documents_fit_a_chunk_is_shared_out_in_whole_documents():
    """ProLong #17: with SP off, chunk edges fell inside documents. Here ranks take whole documents."""
    lengths = [2, 6, 8, 4, 4, 8]
    mb, parts = shards(lengths, 2)
    assert [p.doc_lengths for p in parts] == [[[2, 6, 8]], [[4, 4, 8]]]
    assert all(p.sequence_parallel is None for p in parts)  # attention stays local: no all-to-all
    torch.testing.assert_close(torch.cat([p.input_ids for p in parts], 1), mb.input_ids)
    torch.testing.assert_close(torch.cat([p.targets for p in parts], 1), mb.targets)  # shifted before the split
    assert sum(p.n_targets for p in parts) == mb.n_targets
    # positions restart in every document on every rank
    assert parts[1].layout("cpu").position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]]


def test_a_sample_with_a_long_document_is_cut_into_chunks_with_global_positions_and_boundaries():
    mb, parts = shards([3, 5, 24], 4)
    full = mb.layout("cpu")
    for r, p in enumerate(parts):
        assert p.chunk == (8 * r, 8 * r + 8) and p.sequence_parallel.rank == r
        layout = p.layout("cpu")
        assert layout.cu_seqlens.tolist() == [0, 3, 8, 32]  # attention sees the whole sequence's documents
        torch.testing.assert_close(layout.position_ids, full.position_ids[:, 8 * r:8 * r + 8])
    assert parts[1].layout("cpu").position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]  # RoPE offset per rank
    assert sum(p.n_targets for p in parts) == mb.n_targets


@pytest.mark.parametrize("lengths,sp", [([8] * 4, 4), ([1, 1, 1, 29], 2), ([5, 5, 5, 5, 6, 6], 3)])
def test_document_groups_are_contiguous_non_empty_and_never_split_a_document(lengths, sp):
    groups = document_groups(lengths, sp)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a < b for a, b in groups) and all(groups[i][1] == groups[i + 1][0] for i in range(sp - 1))


def test_sp_switches_on_only_for_a_document_longer_than_a_chunk():
    assert not needs_sequence_parallel([64] * 8, 512, 8)
    assert needs_sequence_parallel([65, 447], 512, 8)


def test_kv_heads_travel_unexpanded_when_sp_divides_them():
    assert kv_expansion(32, 8, 8) == 1  # Llama-3-8B at SP = 8: one KV head per rank, 4× less traffic
    assert kv_expansion(32, 8, 4) == 1
    assert kv_expansion(32, 8, 16) == 2  # more ranks than KV heads: each repeated just enough
    with pytest.raises(ConfigError, match="stage2.sequence_parallel: 4 does not divide the model's 6 attention heads"):
        kv_expansion(6, 2, 4, field="stage2.sequence_parallel")
    with pytest.raises(ConfigError, match="key/value heads"):
        kv_expansion(24, 6, 4)


def test_model_heads_are_checked_before_training(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)  # 6 heads, 2 KV heads
    assert check_model_heads(config, ParallelDims(4, 2)) == 1
    with pytest.raises(ConfigError, match="attention heads"):
        check_model_heads(config, ParallelDims(4, 4))


def test_sequence_parallel_takes_one_sequence_per_micro_batch():
    with pytest.raises(ConfigError, match="stage2.micro_batch_size: must be 1 with sequence_parallel 2"):
        load_recipe(ROOT / "recipes" / "tiny.yaml", ["stage2.sequence_parallel=2", "stage2.micro_batch_size=2"])


# ---------------------------------------------------------------- equivalence on gloo ranks


@pytest.mark.slow
@pytest.mark.parametrize("ac", [False, True], ids=["plain", "activation-checkpointing"])
def test_sp2_gives_the_loss_and_gradients_of_one_process(tmp_path, tiny_model_dir, ac):
    """8 samples of several documents, some split across the group (Ulysses), some shared out whole."""
    whole = grads_on(1, 8, tmp_path, tiny_model_dir)
    sp = grads_on(2, 1, tmp_path, tiny_model_dir, sp=2, ac=ac)
    assert_same_step(sp, whole)


@pytest.mark.slow
def test_sp4_with_kv_heads_repeated_gives_the_loss_and_gradients_of_one_process(tmp_path, tiny_qwen2_dir):
    """Qwen2 with 4 heads and 2 KV heads: at SP = 4 each KV head is repeated twice before the all-to-all."""
    whole = grads_on(1, 8, tmp_path, tiny_qwen2_dir)
    sp = grads_on(4, 1, tmp_path, tiny_qwen2_dir, sp=4)
    assert_same_step(sp, whole)


@pytest.mark.slow
def test_sp2_composes_with_fsdp_data_parallelism_on_a_dp2_x_sp2_mesh(tmp_path, tiny_model_dir):
    whole = grads_on(1, 8, tmp_path, tiny_model_dir)
    mesh = grads_on(4, 1, tmp_path, tiny_model_dir, sp=2, ac=True)
    assert_same_step(mesh, whole)


def assert_same_step(parallel: dict, whole: dict) -> None:
    assert parallel["targets"] == whole["targets"] and parallel["tokens"] == whole["tokens"]
    assert parallel["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert parallel["grads"].keys() == whole["grads"].keys()
    for name, g in whole["grads"].items():
        torch.testing.assert_close(parallel["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_the_tiny_recipe_runs_stage2_with_sp2_on_two_ranks(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", [*FAST, "jobs.nproc_per_node=2", "stage2.sequence_parallel=2"])
    ctx = RunContext(recipe=recipe, store=Store(str(tmp_path / "runs")), run="sp2")
    publish_recipe(ctx)
    for stage in ("data", "stage1"):
        run_stage(ctx, stage)
    m = run_stage(ctx, "stage2").manifest.metrics
    assert m["sequence_parallel"] == 2 and m["world_size"] == 2 and m["accumulation"] == 2
    # the 2K documents are split across the pair; the 512-token ones are shared out whole
    assert 0 < m["sequence_parallel_share"] < 1
    assert m["loss_last"] < m["loss_first"] * 1.05
