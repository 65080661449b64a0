"""Training engine pieces: token-averaged accumulation, reordering, checkpoints and moment hand-off."""

import copy

import pytest
import torch

from prolong.recipe import load_recipe
from prolong.errors import StageError
from prolong.train.lm import TrainingLM
from prolong.model.load import load_model
from prolong.parallel.world import World
from prolong.store import Store
from prolong.train.batch import collate
from prolong.train.checkpoint import Checkpointer
from prolong.parallel.fsdp_engine import FSDPEngine as Engine
from prolong.parallel.dims import ParallelDims
from prolong.train.trainer import Trainer
from tests.conftest import ROOT

WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def sample(seed: int, lengths: list[int], sft: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    s = {"input_ids": torch.randint(10, 4000, (n,), generator=g).numpy().astype("uint32"),
         "indices": torch.tensor([[sum(lengths[:i]), sum(lengths[:i + 1])] for i in range(len(lengths))]).numpy(),
         "domain": "d"}
    if sft:
        s["mask"] = (torch.rand(n, generator=g) > 0.5).numpy().astype("uint8")
    return s


@pytest.fixture
def lm(tiny_model_dir):
    torch.manual_seed(0)
    return TrainingLM(load_model(tiny_model_dir, rope_theta=8e6, dtype="float32"), loss_chunk_size=16)


def one_step_grads(model, micro_batches, reorder=False):
    cfg = load_recipe(ROOT / "recipes" / "tiny.yaml", [f"stage1.reorder_minibatches={reorder}"]).train_stage("stage1")
    engine = Engine(model, cfg, WORLD)
    trainer = Trainer(engine, iter([]), cfg, WORLD, accumulation=len(micro_batches), callbacks=[])
    engine.optimizer.step = lambda *a, **k: None  # keep the gradients to compare them
    engine.optimizer.zero_grad = lambda *a, **k: None
    metrics = trainer.train_step(micro_batches)
    return metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulated_micro_batches_give_the_token_averaged_gradient_of_the_whole_batch(lm):
    """Σ token losses / all target tokens of the step, however the tokens are split (§A.3)."""
    a, b = sample(1, [20, 12], sft=True), sample(2, [32], sft=True)  # very different target counts
    m_split, g_split = one_step_grads(copy.deepcopy(lm), [collate([a]), collate([b])])
    m_whole, g_whole = one_step_grads(copy.deepcopy(lm), [collate([a, b])])
    assert m_split["target_tokens"] == m_whole["target_tokens"]
    assert m_split["loss"] == pytest.approx(m_whole["loss"], rel=1e-6)
    for name in g_whole:
        torch.testing.assert_close(g_split[name], g_whole[name], rtol=1e-4, atol=1e-7, msg=name)


def test_minibatch_reordering_leaves_the_update_unchanged(lm):
    batches = [collate([sample(i, lengths)]) for i, lengths in enumerate([[4] * 8, [32], [16, 16], [8] * 4])]
    assert sorted(mb.attention_cost for mb in batches) != [mb.attention_cost for mb in batches]
    m_plain, g_plain = one_step_grads(copy.deepcopy(lm), batches, reorder=False)
    m_sorted, g_sorted = one_step_grads(copy.deepcopy(lm), batches, reorder=True)
    assert m_plain["loss"] == pytest.approx(m_sorted["loss"], rel=1e-6)
    for name in g_plain:
        torch.testing.assert_close(g_plain[name], g_sorted[name], rtol=1e-4, atol=1e-7, msg=name)


def test_batch_size_that_does_not_divide_is_a_clear_error():
    cfg = load_recipe(ROOT / "recipes" / "tiny.yaml").train_stage("stage1")  # 8 sequences per step
    assert ParallelDims(world=2).accumulation(cfg.global_batch_size, 1, "stage1.batch_tokens") == 4
    with pytest.raises(Exception, match=r"stage1.batch_tokens: 8 sequences per step do not divide into "
                                        r"micro-batches of 1 on 3 data-parallel ranks"):
        ParallelDims(world=3).accumulation(cfg.global_batch_size, 1, "stage1.batch_tokens")


def train_a_little(engine, steps=2):
    for i in range(steps):
        mb = collate([sample(i, [16, 16])])
        engine.backward(engine(mb.input_ids, mb.targets, mb.layout("cpu")), last_micro_batch=True)
        engine.step()


def test_checkpoint_roundtrip_and_optimizer_only_hand_off(lm, tmp_path):
    cfg = load_recipe(ROOT / "recipes" / "tiny.yaml").train_stage("stage1")
    store = Store(str(tmp_path / "runs"))
    engine = Engine(lm, cfg, WORLD)
    train_a_little(engine)
    ckpt = Checkpointer(store, "r/stage1", WORLD)
    ckpt.save(2, engine, {"step": 2, "input_key": "k"})
    assert ckpt.latest() == 2 and store.exists("r/stage1/checkpoints/step_00000002/COMPLETE")

    # full resume: same weights and moments
    fresh = copy.deepcopy(lm)
    for p in fresh.parameters():
        p.data.zero_()
    fresh_engine = Engine(fresh, cfg, WORLD)
    state = ckpt.load(2, fresh_engine)
    assert state["step"] == 2 and state["input_key"] == "k"
    for (n, p), q in zip(lm.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    # moments only: weights untouched, Adam state carried over
    other = copy.deepcopy(lm)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in other.named_parameters()}
    other_engine = Engine(other, cfg, WORLD)
    ckpt.load(2, other_engine, model_too=False, restore_rng=False)
    for n, p in other.named_parameters():
        assert torch.equal(p, before[n]), n
    src, dst = engine.optimizer.state_dict()["state"], other_engine.optimizer.state_dict()["state"]
    assert all(torch.equal(src[i]["exp_avg"], dst[i]["exp_avg"]) for i in src)
    # the next stage restarts its schedule at its own LR even with the moments carried over
    other_engine.restart_schedule()
    assert other_engine.lr == pytest.approx(cfg.lr * 0.5 ** 0 / round(cfg.warmup_ratio * cfg.steps))
    # weights only (a hand-off without keep_optimizer_state): fresh Adam state
    weights_only = copy.deepcopy(other)
    weights_engine = Engine(weights_only, cfg, WORLD)
    ckpt.load(2, weights_engine, optimizer_too=False, restore_rng=False)
    assert all(torch.equal(p, q) for p, q in zip(lm.parameters(), weights_only.parameters()))
    assert not weights_engine.optimizer.state_dict()["state"]


def test_a_checkpoint_from_another_model_shape_is_refused_in_one_line(lm, tmp_path, tiny_model_dir):
    cfg = load_recipe(ROOT / "recipes" / "tiny.yaml").train_stage("stage1")
    store = Store(str(tmp_path / "runs"))
    engine = Engine(lm, cfg, WORLD)
    train_a_little(engine, 1)
    Checkpointer(store, "r/stage1", WORLD).save(1, engine, {"step": 1})
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 2
    config.hidden_size = 64
    small = TrainingLM(LlamaForCausalLM(config))
    with pytest.raises(StageError, match="checkpoint does not match this model/optimizer") as err:
        Checkpointer(store, "r/stage1", WORLD).load(1, Engine(small, cfg, WORLD))
    assert "\n" not in str(err.value)


def test_a_sample_longer_than_the_stage_length_is_refused():
    from prolong.errors import DataError

    with pytest.raises(DataError, match="samples have 600 tokens, the stage trains on 512"):
        collate([sample(0, [600])], seq_len=512)
    bad = sample(0, [10, 22])
    bad["indices"] = bad["indices"][:1]  # documents that do not tile the sample
    with pytest.raises(DataError, match="document indices do not tile its 32 tokens"):
        collate([bad])
