"""The engine's settings, with documented defaults; `0` means "size it from the device's memory"."""

from __future__ import annotations

from dataclasses import dataclass, field



@dataclass
class EngineConfig:
    device: str = field(default="auto", metadata=dict(help="cpu, cuda, or auto (cuda when available)"))
    dtype: str = field(default="auto", metadata=dict(help="float32, float16, bfloat16, or auto (bf16 on cuda, fp32 on cpu)"))
    max_loras: int = field(default=0, metadata=dict(help="device adapter slots (0 = 5%% of device memory, at most 64)"))
    max_cpu_loras: int = field(default=0, metadata=dict(help="adapters cached in host memory (0 = 4x max-loras)"))
    max_lora_rank: int = field(default=16, metadata=dict(help="largest adapter rank the pool accepts; smaller ranks are zero-padded (docs/benchmarks.md measures what padding costs)"))
    kv_cache_mb: int = field(default=0, metadata=dict(help="KV cache budget in MiB (0 = 40%% of free GPU memory, or 1 GiB on cpu)"))
    kv_block_size: int = field(default=16, metadata=dict(help="tokens per KV cache block"))
    prefix_cache: bool = field(default=True, metadata=dict(help="share the KV blocks of computed prompt prefixes between jobs on the same adapter (version and content; a mix: the same mix), so a repeated system prompt or chat history is prefilled once; unused cached blocks are evicted least recently used first when jobs need blocks. On by default: at no sharing it costs nothing measurable, at a shared 512-token system prompt it multiplies throughput (docs/scheduling.md, \"Prefix caching\")"))
    max_running: int = field(default=64, metadata=dict(help="sequences in one batch"))
    max_step_tokens: int = field(default=0, metadata=dict(help="tokens in one forward pass (0 = 512 on cpu, 8192 on cuda)"))
    max_wait_ms: int = field(default=250, metadata=dict(help="bound on the extra wait adapter-aware reordering may add to a job"))
    max_model_len: int = field(default=0, metadata=dict(help="prompt + output tokens per job (0 = the model's context)"))
    lora_backend: str = field(default="auto", metadata=dict(help="LoRA kernels: triton, torch, or auto (triton on cuda)"))
    attention_backend: str = field(default="auto", metadata=dict(help="attention over the paged KV cache: triton (reads the cache in place), seats (each running sequence's K/V also kept in one contiguous row that decode steps read in place, at most as much memory again as the KV cache; what has no seat is read as torch), torch (block-table gather + SDPA), or auto (triton on cuda; on cpu seats or torch, whichever ran decode steps of this model faster when timed at start-up, cached with the plans: see plan-tuning)"))
    cuda_graphs: bool = field(default=True, metadata=dict(help="on cuda, replay decode-only steps from CUDA graphs captured per batch-size bucket (1, 2, 4, ... max-running); ignored on cpu"))
    max_grammars: int = field(default=256, metadata=dict(help="compiled response-format grammars kept (least recently used evicted); a job's format compiles once, then every job with the same format reuses it"))
    plan_tuning: str = field(default="startup", metadata=dict(help="how the CPU LoRA path picks its plan per projection group and step shape: by timing the candidates on this machine at start-up for representative steps and on first use of any other shape (startup), only on first use (first-use), or not at all (off: a fixed default order). With attention-backend auto on cpu, the attention backend is timed at start-up in startup and first-use (it is one per engine), and is seats with off unless cached. Choices are cached per machine and shapes in plan-cache-dir"))
    plan_tuning_budget_s: float = field(default=20.0, metadata=dict(help="the most time start-up tuning may take: the attention probe (attention-backend auto on cpu), then, with plan-tuning startup, the LoRA plans in what is left (steps left untuned are tuned on first use)"))
    plan_cache_dir: str = field(default="", metadata=dict(help="directory of the plan tuner's cache files (empty = ${LORABUS_CACHE:-~/.cache/lorabus}/plans)"))
    stop_timeout_s: float = field(default=10.0, metadata=dict(help="on stop, how long the engine may take to finish the jobs it holds (warm-ups included); the rest are answered internal"))
