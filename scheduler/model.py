"""The base model as flat tensors, run over a ragged batch of sequences with per-token adapters.

The architecture comes from config.json through `ModelSpec` (scheduler/arch.py: Llama, Mistral, Qwen2,
Phi-3; grouped-query attention, biases, tied embeddings, partial rotary); the weights are read by name
from the safetensors checkpoint (`model.safetensors`, or the shards `model.safetensors.index.json` lists),
with no transformers model in between. The forward pass is our own so that a step can mix prefill chunks
and decode tokens of many sequences without padding, read and write the paged KV cache, and apply each
token's own LoRA adapter through `AdapterPool.apply` (the Triton/torch kernels) on the fused projections.

Attention over the paged cache goes through one interface, `CausalLM._attention(layer, q, k, v, step)`,
with a backend chosen once when the engine attaches the cache (`EngineConfig.attention_backend`, auto =
triton on CUDA; on CPU seats or torch, whichever the engine timed faster at start-up,
scheduler/attention_tuning.py): `SeatAttention` (seats: each running sequence's K/V also kept in one
contiguous row, scheduler/seat_kv.py, which decode rows read in place as one strided view, then SDPA; what
has no seat goes the torch way), `BlockTableAttention` (torch: each sequence's K/V read a whole block at a
time into reused buffers, then SDPA; decode rows in one call, prefill spans batched by `PrefillGroup`) and
`TritonPagedAttention` (kernels/paged_attention_triton.py reads the cache in place: one launch per layer
for the whole step, decode rows being chunks of one query, prefill chunks attending their cached prefix
and causally to themselves). The three take the same arguments, so any can be timed against another on
the same step. First prefill chunks (no cached prefix) attend their own new K/V on every torch backend:
no cache read. Triton is imported only by the triton backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from lorabus import kernels
from lorabus.scheduler.arch import ACTIVATIONS, GROUPS, ModelSpec
from lorabus.scheduler.kv_cache import PagedKVCache
from lorabus.scheduler.lora import AdapterPool
from lorabus.scheduler.seat_kv import SeatKV, SeatStep

SINGLE_FILE, SHARD_INDEX = "model.safetensors", "model.safetensors.index.json"


class Checkpoint:
    """The model's safetensors weights, read one tensor at a time by name (one file or a sharded index)."""

    def __init__(self, model_dir: str | Path):
        self.root = root = Path(model_dir)
        if (root / SHARD_INDEX).is_file():
            weight_map = json.loads((root / SHARD_INDEX).read_text())["weight_map"]
            self.files = {name: root / file for name, file in weight_map.items()}
        elif (root / SINGLE_FILE).is_file():
            with safe_open(root / SINGLE_FILE, framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), root / SINGLE_FILE)
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {SHARD_INDEX} in {root} (pickled .bin weights are refused)")

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor `name`, which must have `shape` (a config.json that disagrees with its weights is refused)."""
        if name not in self.files:
            raise ValueError(f"{self.root}: the checkpoint has no tensor {name}")
        with safe_open(self.files[name], framework="pt") as f:
            tensor = f.get_tensor(name)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{self.root}: {name} has shape {tuple(tensor.shape)}, config.json implies {shape}")
        return tensor


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass
class PrefillSpan:
    """One sequence's new tokens when more than one: rows [start, start+length) at positions from `past`."""

    start: int
    length: int
    past: int


@dataclass
class PrefillGroup:
    """Prefill spans of several sequences attended in one call, queries padded to `length` rows each.

    Row r of span s is query `q_index[s * length + r]`; `valid` picks the real rows of the padded
    [S * length] result (None: every row is real) and `rows` says where they go. Keys come a block at a
    time from `blocks` [S, NB] (padded with the cache's null block), or, in a `fresh` group (every span
    starts at position 0), from the step's own new K/V rows `q_index`: no cache read. `mask`
    [S, 1, length, keys] (keys: NB * block, or `length` when fresh) is causal over each span's past and
    its own rows; None means every span starts at position 0 with exactly `length` rows, so a causal call
    over the first `length` keys is exact."""

    length: int
    q_index: torch.Tensor  # [S * length]
    valid: torch.Tensor | None  # [R] positions in the padded result that are real rows
    rows: torch.Tensor  # [R] their rows in the step
    blocks: torch.Tensor  # [S, NB]
    mask: torch.Tensor | None  # [S, 1, length, NB * block_size or length]
    fresh: bool = False


@dataclass
class StepBatch:
    """Everything one forward pass needs; built once per step by the runner, shared by every layer."""

    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T] cache index each new token's K/V goes to
    lora: "kernels.LoRAMapping"  # per-token adapter slot (-1 = base model)
    decode_rows: torch.Tensor  # [B] rows of single-token sequences
    decode_blocks: torch.Tensor  # [B, NB] their block tables, padded with the cache's null block
    decode_mask: torch.Tensor  # [B, 1, 1, NB * block_size] True where a real context position
    prefills: list[PrefillGroup]
    logit_rows: torch.Tensor  # [N] rows whose next-token logits are wanted
    paged: "PagedBatch | None" = None  # the in-place backend's layout (then the decode/prefill fields are empty)
    seats: SeatStep | None = None  # the seat backend's seated rows (then the decode fields hold only the others)


@dataclass
class PagedBatch:
    """Every sequence of a step for attention that reads the cache in place: sequence i's rows are
    [cu_seqlens[i], cu_seqlens[i+1]) of the step, its context (cached prefix + new rows) is
    context_lens[i] positions, read through its block table blocks[i] (padded with the null block)."""

    blocks: torch.Tensor  # [N, NB]
    context_lens: torch.Tensor  # [N]
    cu_seqlens: torch.Tensor  # [N + 1]
    max_q_len: int  # longest run of new rows (1: a decode-only step)


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """[S, Hkv, NB * block_size, D]: the K or V of each row of block tables `blocks` [S, NB], read a whole
    block at a time from `cache` [num_blocks + 1, block_size, Hkv, D] (one index_select, no per-token index),
    into `scratch` (flat, large enough) when given."""
    s, nb = blocks.shape
    _, block_size, heads, dim = cache.shape
    # On rows of a 2-D view: CPU index_select copies each whole block with one memcpy (4x the 4-D speed).
    rows = cache.view(cache.shape[0], -1)
    if scratch is None:
        out = rows.index_select(0, blocks.reshape(-1))
    else:
        out = torch.index_select(rows, 0, blocks.reshape(-1), out=scratch[: s * nb * rows.shape[1]].view(s * nb, -1))
    return out.view(s, nb * block_size, heads, dim).transpose(1, 2)


class BlockTableAttention:
    """The torch backend: K/V gathered a block at a time by block table into reused buffers, then SDPA."""

    name, in_place = "torch", False

    def __init__(self, kv: PagedKVCache, dtype: torch.dtype, device: torch.device):
        self.kv, self.dtype, self.device = kv, dtype, device
        _, _, block_size, heads, dim = kv.k_blocks.shape
        self._block_numel = block_size * heads * dim
        # Reused K and V gather buffers (one layer's reads at a time): no fresh allocation per layer.
        self._scratch: list[torch.Tensor] = []

    def _gather_scratch(self, step: StepBatch) -> list[torch.Tensor]:
        """K and V buffers big enough for the largest block-table read of this step."""
        need = max([step.decode_blocks.numel()] + [g.blocks.numel() for g in step.prefills if not g.fresh])
        need *= self._block_numel
        if not self._scratch or self._scratch[0].numel() < need:
            self._scratch = [torch.empty(need, dtype=self.dtype, device=self.device) for _ in range(2)]
        return self._scratch

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepBatch) -> torch.Tensor:
        num_tokens = q.shape[0]
        if not step.prefills and step.seats is None:  # decode only: every row is a decode row, in order
            k_buf, v_buf = self._gather_scratch(step)
            return self._decode(q, self.kv.k_blocks[layer], self.kv.v_blocks[layer], step, k_buf,
                                v_buf).reshape(num_tokens, -1)
        out = torch.empty_like(q)
        self._attend(layer, q, k, v, step, out)
        return out.reshape(num_tokens, -1)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepBatch,
                out: torch.Tensor) -> None:
        """Into `out`: the block-table decode rows, and every prefill group."""
        k_cache, v_cache = self.kv.k_blocks[layer], self.kv.v_blocks[layer]
        k_buf, v_buf = self._gather_scratch(step)
        if step.decode_rows.numel():
            out.index_copy_(0, step.decode_rows, self._decode(q[step.decode_rows], k_cache, v_cache, step,
                                                                   k_buf, v_buf))
        for group in step.prefills:
            s, n = group.blocks.shape[0], group.length
            qp = q.index_select(0, group.q_index).view(s, n, *q.shape[1:]).transpose(1, 2)  # [S, H, n, D]
            if group.fresh:  # every span starts at 0: its keys are its own new K/V (padded rows repeat the last)
                kp = k.index_select(0, group.q_index).view(s, n, *k.shape[1:]).transpose(1, 2)
                vp = v.index_select(0, group.q_index).view(s, n, *v.shape[1:]).transpose(1, 2)
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=group.mask, is_causal=group.mask is None,
                                                    enable_gqa=True)
            else:
                kp = gather_blocks(k_cache, group.blocks, k_buf)  # [S, Hkv, C, D]
                vp = gather_blocks(v_cache, group.blocks, v_buf)
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=group.mask, enable_gqa=True)
            op = op.transpose(1, 2).reshape(s * n, *q.shape[1:])
            out.index_copy_(0, group.rows, op if group.valid is None else op.index_select(0, group.valid))

    @staticmethod
    def _decode(qd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: StepBatch,
                k_buf: torch.Tensor, v_buf: torch.Tensor) -> torch.Tensor:
        """[B, H, D] attention of each decode row's query over its sequence's cached context."""
        kd = gather_blocks(k_cache, step.decode_blocks, k_buf)  # [B, Hkv, C, D]
        vd = gather_blocks(v_cache, step.decode_blocks, v_buf)
        od = F.scaled_dot_product_attention(qd.unsqueeze(2), kd, vd, attn_mask=step.decode_mask, enable_gqa=True)
        return od.squeeze(2)


class SeatAttention(BlockTableAttention):
    """The seats backend: new K/V also go to their sequence's seat row (scheduler/seat_kv.py) and the
    seated decode rows read their context there in place, one masked SDPA over a strided view; decode rows
    without a seat and prefill chunks go the torch way (block gather, or fresh K/V)."""

    name = "seats"

    def __init__(self, kv: PagedKVCache, dtype: torch.dtype, device: torch.device):
        super().__init__(kv, dtype, device)
        self.seats = SeatKV(kv)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepBatch) -> torch.Tensor:
        plan = step.seats
        if plan is None:
            return super().__call__(layer, q, k, v, step)
        self.seats.write(layer, plan, k, v)
        if plan.in_order:  # a decode-only step whose rows are the seats in order: one SDPA, nothing moved
            return self._read_seats(layer, q, plan).reshape(q.shape[0], -1)
        out = torch.empty_like(q)
        if plan.hi > plan.lo:
            od = self._read_seats(layer, q.index_select(0, plan.q_rows), plan)
            out.index_copy_(0, plan.out_rows, od if plan.keep is None else od.index_select(0, plan.keep))
        if step.decode_rows.numel() or step.prefills:
            self._attend(layer, q, k, v, step, out)
        return out.reshape(q.shape[0], -1)

    def _read_seats(self, layer: int, qs: torch.Tensor, plan: SeatStep) -> torch.Tensor:
        """[W, H, D] attention of seats lo..hi's queries `qs` over their rows' first `context` keys."""
        ks = self.seats.k[layer, plan.lo:plan.hi, :, :plan.context]  # [W, Hkv, C, D], a view
        vs = self.seats.v[layer, plan.lo:plan.hi, :, :plan.context]
        return F.scaled_dot_product_attention(qs.unsqueeze(2), ks, vs, attn_mask=plan.mask, enable_gqa=True).squeeze(2)


class TritonPagedAttention:
    """The triton backend: the paged-attention kernel reads K/V where they lie, one launch per layer for
    every sequence of the step (the cache's layout was fixed when it was built: no per-call checks)."""

    name, in_place = "triton", True

    def __init__(self, kv: PagedKVCache, head_dim: int):
        from lorabus.kernels import paged_attention_triton  # imports triton: only on this backend

        self._launch = paged_attention_triton.paged_attention
        self.kv, self.block_size = kv, kv.block_size
        self.scale = head_dim ** -0.5  # SDPA's default, as the torch backend uses

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepBatch) -> torch.Tensor:
        p = step.paged
        out = torch.empty_like(q)
        self._launch(q, self.kv.k[layer], self.kv.v[layer], p.blocks, p.context_lens, p.cu_seqlens,
                     p.max_q_len, self.scale, self.block_size, out)
        return out.view(q.shape[0], -1)


ATTENTION_BACKENDS = ("auto", "seats", "torch", "triton")


def make_attention(backend: str, kv: PagedKVCache, head_dim: int, dtype: torch.dtype, device: torch.device):
    """The attention backend `backend` (auto, seats, torch or triton) over `kv`: auto is triton on CUDA,
    seats elsewhere (on CPU the engine then replaces it with what scheduler/attention_tuning.py measured)."""
    if backend == "seats":
        return SeatAttention(kv, dtype, device)
    if kernels.resolve_attention_backend(backend, device) == "triton":  # also refuses an unknown name
        return TritonPagedAttention(kv, head_dim)
    return SeatAttention(kv, dtype, device) if backend == "auto" else BlockTableAttention(kv, dtype, device)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as transformers' LlamaRMSNorm, so outputs match PEFT bit for bit where possible.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    """cos and sin [T, rotary_dim] of each position, with the same operations as transformers' rotary
    embedding: float32 angles, scaled, then cast to the activations' dtype."""
    freqs = positions[:, None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading cos.shape[-1] dims of each head; the rest (partial rotary) pass through."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


class CausalLM:
    def __init__(self, spec: ModelSpec, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.config = spec  # the engine reads `config.eos_token_id`
        self.device, self.dtype = device, dtype
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.vocab_size, self.max_context, self.eps = spec.vocab_size, spec.max_context, spec.norm_eps
        self.act = ACTIVATIONS[spec.hidden_act]
        self.inv_freq, self.rope_scaling = spec.rope.frequencies(device)
        family, hidden = spec.family, spec.hidden_size

        def take(name, shape):
            return checkpoint.get(name, shape).to(device=device, dtype=dtype).contiguous()

        self.embed = take(f"{family.embed}.weight", (spec.vocab_size, hidden))
        self.norm = take(f"{family.final_norm}.weight", (hidden,))
        tied = spec.tie_word_embeddings
        self.lm_head = self.embed if tied else take(f"{family.lm_head}.weight", (spec.vocab_size, hidden))
        self.layers: list[Layer] = []
        for i in range(spec.num_layers):
            projections = {}
            for group in GROUPS:
                projections[group], projections[f"{group}_bias"] = self._load_group(checkpoint, i, group)
            self.layers.append(Layer(attn_norm=take(f"{spec.module_name(i, family.attn_norm)}.weight", (hidden,)),
                                     mlp_norm=take(f"{spec.module_name(i, family.mlp_norm)}.weight", (hidden,)),
                                     **projections))
        self.shapes = spec.shapes
        self._qkv_split = spec.widths("qkv")
        self.pool: AdapterPool | None = None
        self.kv: PagedKVCache | None = None
        self.attention: BlockTableAttention | SeatAttention | TritonPagedAttention | None = None

    def _load_group(self, checkpoint: Checkpoint, layer: int, group: str):
        """A group's weight [out, in] with its modules fused along out, and its bias (None if no module has one)."""
        spec = self.spec
        d_in = spec.projections[GROUPS[group][0]][0]
        modules = spec.family.modules[group]
        widths = [sum(spec.projections[s][1] for s in spec.targets[module]) for module in modules]
        names = [spec.module_name(layer, module) for module in modules]
        weight = torch.cat([checkpoint.get(f"{name}.weight", (width, d_in)) for name, width in zip(names, widths)])
        bias = None
        if any(module in spec.biases for module in modules):
            bias = torch.cat([checkpoint.get(f"{name}.bias", (width,)) if module in spec.biases
                              else weight.new_zeros(width) for module, name, width in zip(modules, names, widths)])
            bias = bias.to(device=self.device, dtype=self.dtype).contiguous()
        return weight.to(device=self.device, dtype=self.dtype).contiguous(), bias

    @classmethod
    def from_pretrained(cls, model_dir: str, device: torch.device, dtype: torch.dtype) -> "CausalLM":
        return cls(ModelSpec.from_dir(model_dir), Checkpoint(model_dir), device, dtype)

    def attach(self, pool: AdapterPool, kv: PagedKVCache, attention_backend: str = "torch") -> None:
        """Use this adapter pool and KV cache, with attention by `attention_backend` (ATTENTION_BACKENDS)."""
        self.pool, self.kv = pool, kv
        self.attention = make_attention(attention_backend, kv, self.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, step: StepBatch) -> torch.Tensor:
        """Next-token logits (float32) for `step.logit_rows`."""
        pool, kv, lora = self.pool, self.kv, step.lora
        num_tokens = step.tokens.shape[0]
        h = self.embed[step.tokens]
        cos, sin = rope_cos_sin(step.positions, self.inv_freq, self.rope_scaling, h.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, layer.attn_norm, self.eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            pool.apply(i, "qkv", x, qkv, lora)
            q, k, v = qkv.split(self._qkv_split, dim=-1)
            q = q.view(num_tokens, self.num_heads, self.head_dim)
            k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
            v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
            q = _apply_rope(q, cos, sin)
            k = _apply_rope(k, cos, sin)
            kv.write(i, step.write_slots, k, v)
            attn = self._attention(i, q, k, v, step)
            o = F.linear(attn, layer.o, layer.o_bias)
            pool.apply(i, "o", attn, o, lora)
            h = h + o
            x = _rms_norm(h, layer.mlp_norm, self.eps)
            gate_up = F.linear(x, layer.gate_up, layer.gate_up_bias)
            pool.apply(i, "gate_up", x, gate_up, lora)
            gate, up = gate_up.chunk(2, dim=-1)
            act = self.act(gate) * up
            down = F.linear(act, layer.down, layer.down_bias)
            pool.apply(i, "down", act, down, lora)
            h = h + down
        h = _rms_norm(h[step.logit_rows], self.norm, self.eps)
        return F.linear(h, self.lm_head).float()

    def _attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   step: StepBatch) -> torch.Tensor:
        """[T, H * D] attention of each row's query (its new K/V k, v, already in the cache) over its
        sequence's context (the chosen backend)."""
        return self.attention(layer, q, k, v, step)
