"""The base model as flat tensors, run over a ragged batch of sequences with per-token adapters.

Weights come from a Hugging Face Llama-family checkpoint (Llama, Mistral, Qwen2: grouped-query
attention, optional q/k/v biases, tied or untied embeddings) loaded through transformers; the
forward pass is our own so that a step can mix prefill chunks and decode tokens of many sequences
without padding, read and write the paged KV cache, and apply each token's own LoRA adapter
through `AdapterPool.apply` (the Triton/torch kernels) on the fused projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from scheduler.adapters import ModelShapes
from scheduler.kv_cache import PagedKVCache
from scheduler.lora import AdapterPool

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


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
    kv_slots: torch.Tensor  # cache index of positions [0, past+length)


@dataclass
class StepBatch:
    """Everything one forward pass needs; built once per step by the engine, shared by every layer."""

    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T] cache index each new token's K/V goes to
    lora: "kernels.LoRAMapping"  # per-token adapter slot (-1 = base model)
    decode_rows: torch.Tensor  # [B] rows of single-token sequences
    decode_kv_slots: torch.Tensor  # [B, C] cache index of their context, padded with the cache's null slot
    decode_mask: torch.Tensor  # [B, 1, 1, C] True where a real context position
    prefills: list[PrefillSpan]
    logit_rows: torch.Tensor  # [N] rows whose next-token logits are wanted


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as transformers' LlamaRMSNorm, so outputs match PEFT bit for bit where possible.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _cat_bias(linears) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in linears])


class CausalLM:
    def __init__(self, hf_model, device: torch.device, dtype: torch.dtype):
        config = hf_model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {config.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        # Sequences never exceed the attention window, so sliding-window models run as full attention.
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.max_context = min(config.max_position_embeddings, window or config.max_position_embeddings)
        self.config = config
        self.device, self.dtype = device, dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        body = hf_model.model
        self.rotary = body.rotary_emb.to(device)
        self.act = body.layers[0].mlp.act_fn

        def take(t):
            return t.detach().to(device=device, dtype=dtype).contiguous() if t is not None else None

        self.embed = take(body.embed_tokens.weight)
        self.norm = take(body.norm.weight)
        self.lm_head = take(hf_model.lm_head.weight)
        self.layers: list[Layer] = []
        for block in body.layers:
            attn, mlp = block.self_attn, block.mlp
            self.layers.append(
                Layer(
                    attn_norm=take(block.input_layernorm.weight),
                    qkv=take(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
                    qkv_bias=take(_cat_bias([attn.q_proj, attn.k_proj, attn.v_proj])),
                    o=take(attn.o_proj.weight),
                    o_bias=take(attn.o_proj.bias),
                    mlp_norm=take(block.post_attention_layernorm.weight),
                    gate_up=take(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    gate_up_bias=take(_cat_bias([mlp.gate_proj, mlp.up_proj])),
                    down=take(mlp.down_proj.weight),
                    down_bias=take(mlp.down_proj.bias),
                )
            )
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        hidden, inter = config.hidden_size, config.intermediate_size
        self.shapes = ModelShapes(
            num_layers=len(self.layers),
            projections={
                "q_proj": (hidden, q_out),
                "k_proj": (hidden, kv_out),
                "v_proj": (hidden, kv_out),
                "o_proj": (q_out, hidden),
                "gate_proj": (hidden, inter),
                "up_proj": (hidden, inter),
                "down_proj": (inter, hidden),
            },
        )
        self._qkv_split = [q_out, kv_out, kv_out]
        self.pool: AdapterPool | None = None
        self.kv: PagedKVCache | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str, device: torch.device, dtype: torch.dtype) -> "CausalLM":
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
        return cls(hf_model, device, dtype)

    def attach(self, pool: AdapterPool, kv: PagedKVCache) -> None:
        self.pool, self.kv = pool, kv

    @torch.inference_mode()
    def forward(self, step: StepBatch) -> torch.Tensor:
        """Next-token logits (float32) for `step.logit_rows`."""
        pool, kv, lora = self.pool, self.kv, step.lora
        num_tokens = step.tokens.shape[0]
        h = self.embed[step.tokens]
        cos, sin = self.rotary(h, step.positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, layer.attn_norm, self.eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            pool.apply(i, "qkv", x, qkv, lora)
            q, k, v = qkv.split(self._qkv_split, dim=-1)
            q = q.view(num_tokens, self.num_heads, self.head_dim)
            k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
            v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kv.write(i, step.write_slots, k, v)
            attn = self._attention(i, q, step)
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

    def _attention(self, layer: int, q: torch.Tensor, step: StepBatch) -> torch.Tensor:
        out = torch.empty_like(q)
        k_cache, v_cache = self.kv.k[layer], self.kv.v[layer]
        if step.decode_rows.numel():
            qd = q[step.decode_rows].unsqueeze(2)  # [B, H, 1, D]
            kd = k_cache[step.decode_kv_slots].transpose(1, 2)  # [B, Hkv, C, D]
            vd = v_cache[step.decode_kv_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=step.decode_mask, enable_gqa=True)
            out[step.decode_rows] = od.squeeze(2)
        for span in step.prefills:
            rows = slice(span.start, span.start + span.length)
            qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            kp = k_cache[span.kv_slots].transpose(0, 1).unsqueeze(0)
            vp = v_cache[span.kv_slots].transpose(0, 1).unsqueeze(0)
            if span.past == 0:
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
            else:
                total = span.past + span.length
                mask = torch.arange(total, device=q.device)[None, :] <= (
                    span.past + torch.arange(span.length, device=q.device)[:, None]
                )
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)
            out[rows] = op[0].transpose(0, 1)
        return out.reshape(q.shape[0], -1)
