"""Per-rank memory of one training micro-batch: an analytic model and a measurement to check it.

The model counts what autograd keeps for backward in an HF Llama-style decoder layer (RMSNorm
upcasts to fp32 and keeps its fp32 input and normalised output; q/k/v after RoPE, the attention
output and its log-sum-exp; the SwiGLU intermediates), with the fused chunked loss of
``prolong.train.loss``, activation checkpointing per layer, Ulysses (every rank holds ``L / sp``
tokens of each activation; attention holds the whole sequence for ``H / sp`` heads, the same
bytes) and FSDP (fp32 master weights, gradients and Adam moments sharded over all ranks).
``docs/memory-model.md`` applies it to Llama-3-8B at 512K with SP = 8; ``measure_step`` reads the
peak from torch.distributed's MemTracker (CPU too), which tests compare with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1024 ** 3


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int

    @classmethod
    def of(cls, config) -> "Shape":
        h, heads = config.hidden_size, config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        d = getattr(config, "head_dim", None) or h // heads
        i, n, v = config.intermediate_size, config.num_hidden_layers, config.vocab_size
        per_layer = h * (heads * d) * 2 + h * (kv * d) * 2 + 3 * h * i + 2 * h
        embeddings = v * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
        return cls(h, i, n, heads, kv, d, v, n * per_layer + embeddings + h)


@dataclass
class MemoryEstimate:
    """Bytes per rank. ``activations`` is the step's peak above the model states."""
    states: dict[str, int] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def activations(self) -> int:
        return max(sum(p.values()) for p in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: sum(self.phases[k].values()))

    @property
    def total(self) -> int:
        return sum(self.states.values()) + self.activations


def layer_saved_bytes_per_token(s: Shape, b: int) -> int:
    """What one decoder layer keeps for backward, per token, computing in ``b``-byte floats."""
    norm = (2 * s.hidden + 1) * 4 + s.hidden * b  # fp32 input and normalised copy, rsqrt; bf16 output
    attention = (3 * s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim + s.hidden) * b + 4 * s.heads
    # q, k, v after RoPE; output and its [tokens, heads] copy; o_proj input; fp32 log-sum-exp
    mlp = 4 * s.intermediate * b  # gate, silu(gate), up, down's input
    return 2 * norm + attention + mlp


def estimate(s: Shape, *, seq_len: int, sequence_parallel: int = 1, world_size: int = 1,
             activation_checkpointing: bool = True, loss_chunk_size: int = 8192, compute_bytes: int = 2,
             fsdp_prefetch_layers: int = 2) -> MemoryEstimate:
    """Per-rank bytes for micro-batch 1 of ``seq_len`` tokens."""
    b, t = compute_bytes, seq_len // sequence_parallel  # every activation holds this rank's tokens
    h, i, v = s.hidden, s.intermediate, s.vocab
    layer_params = s.params // max(s.layers, 1)
    est = MemoryEstimate()
    est.states = {
        "fp32 weights (sharded)": 4 * s.params // world_size,
        "fp32 gradients (sharded)": 4 * s.params // world_size,
        "Adam moments (sharded)": 8 * s.params // world_size,
    }
    if world_size > 1:  # FSDP's all-gathered compute copies of the current and prefetched layers
        est.states["gathered layers"] = fsdp_prefetch_layers * layer_params * (b + 4)
    layer = layer_saved_bytes_per_token(s, b) * t
    kept = s.layers * t * h * b if activation_checkpointing else s.layers * layer
    final_norm = ((2 * h + 1) * 4 + h * b) * t
    chunk = min(loss_chunk_size, t)
    est.phases["loss (forward)"] = {
        "layers": kept, "final norm": final_norm,
        "∂loss/∂hidden": t * h * b, "∂loss/∂output embedding (fp32)": v * h * 4,
        "logits chunk (fp32) and its softmax grad": chunk * v * (4 + (b if b != 4 else 0)),
    }
    est.phases["backward (one layer)"] = {
        "layers": kept, "∂loss/∂output embedding": v * h * b,
        **({"recomputed layer": layer} if activation_checkpointing else {}),
        "gradients in flight": t * (2 * i + 2 * h) * b,
    }
    return est


def report(est: MemoryEstimate) -> str:
    lines = [f"- {name}: {n / GiB:.2f} GiB" for name, n in est.states.items()]
    for phase, parts in est.phases.items():
        lines.append(f"- {phase}: {sum(parts.values()) / GiB:.2f} GiB of activations")
        lines += [f"  - {name}: {n / GiB:.2f} GiB" for name, n in parts.items()]
    lines.append(f"- **peak: {est.total / GiB:.1f} GiB** ({est.peak_phase})")
    return "\n".join(lines)


def measure_step(model, micro_batch, device: str = "cpu") -> dict[str, int]:
    """Run forward + backward of ``micro_batch`` under torch.distributed's MemTracker (it follows
    every tensor's storage, on any device, collectives included) and return the bytes by kind at
    the moment of peak memory: param, buffer, grad, act, temp, ... and total."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(micro_batch.input_ids, micro_batch.targets, micro_batch.layout(device)).backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {str(getattr(kind, "name", kind)).lower(): n for kind, n in peak.items()}
