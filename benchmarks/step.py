"""One decode step of the engine, phase by phase, next to a plain torch decode loop (the ceiling).

    .venv/bin/python benchmarks/step.py [--model DIR] [--model-shape small] [--batch 64] [--prompt-len 128]
                              [--repeats 5] [--steps 4] [--threads 1] [--prefill-prompts 32]
                              [--prefill-len 16] [--json out.json]
                              [--device cuda] [--attention-backend auto] [--versus-attention torch]
                              [--no-cuda-graphs]
                              [--adapter-mix distinct|zipf]

Three engine variants, each an `Engine` (not started: this script calls its step loop's `iterate()`
itself, on the main thread) holding --batch running sequences that decode together:

* base: every sequence on the base model (no adapter);
* 1 adapter: every sequence on the same rank-16 adapter (q, k, v, o);
* 64 adapters: sequence i on adapter i mod 64 (exactly min(batch, 64) distinct adapters, all resident);
  with --adapter-mix zipf, each sequence's adapter drawn from the 64 with Zipf popularity (s = 1.1, fixed
  seed) instead: hot adapters decode several sequences beside single ones, as in serving.

Next to them, three ceilings over the same weights with no engine: a minimal hand-written decode loop
(batch x 1 token, a contiguous KV tensor [B, Hkv, C, D] per layer, SDPA, no paging, no scheduler,
greedy argmax) — alone ("plain"), with one adapter's LoRA as two dense matmuls per projection ("plain +
1 LoRA") and with ideally pre-stacked per-token LoRA ("plain + stacked LoRA": each token's A and
scale*B gathered into [T, in, R] / [T, R, out] tensors before timing, so only the two bmm's per
projection are timed). Every engine variant's "x ceiling" is its step time over the matching ceiling's.
Under the tables, "goals" gives the issue-11 step targets and the ceiling for the serving target "64-adapter
throughput >= 0.85x of one adapter": "plain + 1 LoRA" step time over "plain + stacked LoRA" step time,
paired per repeat, next to the engine's own 1-adapter / 64-adapter step time ratio.

All six run interleaved step by step (the order rotated every round) at the same context length.
Each repeat runs --steps rounds with no phase hooks (the totals) and then --steps rounds with the
hooks on (the breakdown); tables give median [min..max] over --repeats repeats of the per-repeat
means. Phase hooks wrap the engine's functions from here (nothing in scheduler/ or kernels/ is
edited): `F.linear` / `F.scaled_dot_product_attention` as the model module sees them, the model's
`_attention`, `_rms_norm`, `rope_cos_sin`, `_apply_rope`, `act`, the KV cache's `write`,
`kernels.lora_shrink` / `lora_expand` and the pool's `apply`, the runner's `_step_batch` and the
scheduler's `schedule`. A hook whose target no longer exists (the engine changes) reports "n/a";
phases that are differences (KV gather = `_attention` minus SDPA; "residual, embed, rest" = forward
minus the hooked phases; host = step minus forward) are n/a when a term is.

--device cuda runs the engines and the plain loops on the GPU (in the engine's dtype, bf16 by default):
phase hooks then synchronize the device around each hooked call (the breakdown serializes the GPU, the
unhooked totals do not), and with CUDA graphs on (the default there) the hooks are not installed at all
(Python hooks cannot run inside a replayed graph): only the totals are measured, so run once more with
--no-cuda-graphs for the breakdown. --attention-backend picks the engine's attention (auto: triton on
CUDA; on CPU seats or torch, the block-table gather, whichever the engine timed faster at start-up). Every table names the CPU model (/proc/cpuinfo).

--versus-attention BACKEND adds the base and 64-adapter engines on another attention backend to the same
interleaved rounds (e.g. torch, the block-table gather, against the default seats on CPU): a before / after
comparison within one run, reported under the table as step time and x its ceiling.

--prefill-*: batched prefill of --prefill-prompts prompts of ~--prefill-len tokens (lengths
len-4..len+4) to their first token, the engine (base model, fresh sequences, one `iterate()` per
step until all are answered) against Hugging Face `generate(max_new_tokens=1)` on the same prompts
left-padded into one batch; interleaved, --repeats repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling serving.py, also under -P / PYTHONSAFEPATH
from serving import RANK, build_assets, machine, model_assets, zipf_choice  # noqa: E402

VARIANTS = ("base", "1 adapter", "64 adapters")
CEILINGS = {"base": "plain", "1 adapter": "plain + 1 LoRA", "64 adapters": "plain + stacked LoRA"}


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (the platform's processor string where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def mmm(values, fmt=".2f") -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    med, lo, hi = statistics.median(values), min(values), max(values)
    if format(lo, fmt) == format(hi, fmt):
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(lo, fmt)}..{format(hi, fmt)}]"


# ---- phase hooks --------------------------------------------------------------------------------


class Timers:
    """Accumulates seconds per phase while `on`; wrappers installed once, transparent while off."""

    def __init__(self, sync=None):
        self.on = False
        self.sync = sync or (lambda: None)  # the device's synchronize on CUDA: a phase's time is its work
        self.acc: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.found: set[str] = set()

    def wrap(self, name: str, fn):
        timers = self
        self.found.add(name)

        def timed(*args, **kwargs):
            if not timers.on:
                return fn(*args, **kwargs)
            timers.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.sync()
                timers.acc[name] += time.perf_counter() - t0
                timers.calls[name] += 1

        timed.__wrapped__ = fn
        return timed

    def patch(self, obj, attr: str, name: str) -> bool:
        fn = getattr(obj, attr, None)
        if fn is None or not callable(fn):
            return False
        try:
            setattr(obj, attr, self.wrap(name, fn))
        except (AttributeError, TypeError):
            self.found.discard(name)
            return False
        return True


def install_hooks(timers: Timers, engines: list[Engine]) -> list[str]:
    """Wrap the engine's phases; returns what could not be hooked."""
    missing = []
    import lorabus.kernels as kernels
    import lorabus.scheduler.model as model_mod

    # F as the model module sees it: linear (base matmuls + lm_head) and SDPA; everything else passes through.
    if hasattr(model_mod, "F"):
        proxy = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
        proxy.linear = timers.wrap("linear", F.linear)
        proxy.scaled_dot_product_attention = timers.wrap("sdpa", F.scaled_dot_product_attention)
        model_mod.F = proxy
    else:
        missing += ["linear", "sdpa"]
    for attr, name in (("_rms_norm", "norm"), ("rope_cos_sin", "rope"), ("_apply_rope", "rope"),
                       ("gather_blocks", "kv_gather")):
        if not timers.patch(model_mod, attr, name):
            missing.append(f"model.{attr}")
    for attr, name in (("lora_shrink", "shrink"), ("lora_expand", "expand")):
        if not timers.patch(kernels, attr, name):
            missing.append(f"kernels.{attr}")
    for engine in engines:
        model = engine.model
        for obj, attr, name in ((model, "forward", "forward"), (model, "_attention", "attention"), (model, "act", "act"),
                                (getattr(engine, "kv", None), "write", "kv_write"),
                                (getattr(getattr(engine, "adapters", None), "pool", None), "apply", "lora_apply"),
                                (getattr(engine, "runner", None), "_step_batch", "step_tensors"),
                                (getattr(engine, "scheduler", None), "schedule", "schedule")):
            if obj is None or not timers.patch(obj, attr, name):
                missing.append(f"{type(obj).__name__}.{attr}")
    return sorted(set(missing))


def phases(acc: dict[str, float], found: set[str], step_s: float, calls: dict[str, int]) -> dict[str, float | None]:
    """The breakdown (seconds) of one hooked step from the accumulated timers; None where a hook is missing
    (or, for LoRA shrink / expand, where the pool applied LoRA without calling the hooked public ops)."""
    def get(*names):
        return sum(acc.get(n, 0.0) for n in names) if all(n in found for n in names) else None

    def diff(a, *b):
        return None if a is None or any(x is None for x in b) else a - sum(b)

    linear, sdpa, attention, kv_write = get("linear"), get("sdpa"), get("attention"), get("kv_write")
    shrink, expand, apply = get("shrink"), get("expand"), get("lora_apply")
    if apply and not calls.get("shrink"):  # LoRA ran through another path (e.g. a fused slot-major op)
        shrink = expand = None
    forward = get("forward")
    norms = get("norm", "rope", "act")
    kv = None if attention is None or sdpa is None or kv_write is None else attention - sdpa + kv_write
    lora = apply if apply is not None else (None if shrink is None or expand is None else shrink + expand)
    rest = diff(forward, linear, kv, sdpa, lora, norms)
    return {
        "base matmuls + lm_head (F.linear)": linear,
        "KV gather + scatter (_attention - SDPA, + kv.write)": kv,
        "of which block gather (model.gather_blocks)": get("kv_gather"),
        "attention (SDPA)": sdpa,
        "LoRA shrink (kernels.lora_shrink)": shrink,
        "LoRA expand (kernels.lora_expand)": expand,
        "LoRA total (pool.apply)": apply,
        "norms, rope, activation (hooked)": norms,
        "residual, embed, split/view, rest of forward": rest,
        "forward total": forward,
        "step tensors + mapping (runner._step_batch)": get("step_tensors"),
        "scheduler (schedule)": get("schedule"),
        "host rest: sampling, argmax copy, bookkeeping": diff(step_s, forward, get("step_tensors"), get("schedule")),
        "step (hooked)": step_s,
    }


# ---- the engine variants ------------------------------------------------------------------------


def make_engine(model_dir: Path, adapters, batch: int, kv_mb: int, args, attention: str | None = None) -> Engine:
    engine = Engine(str(model_dir), EngineConfig(device=args.device, max_lora_rank=RANK, max_running=batch,
                                                 max_loras=max(1, min(64, len(adapters))), kv_cache_mb=kv_mb,
                                                 max_step_tokens=512,
                                                 attention_backend=attention or args.attention_backend,
                                                 cuda_graphs=args.cuda_graphs))
    for key, path in adapters:
        engine.register(AdapterSpec(key, str(path)))
    engine.adapters.start()  # the loader thread; the step loop runs here, on the main thread
    return engine


def fill(engine: Engine, keys: list[str | None], prompts: list[list[int]], max_new: int, log) -> list:
    """Submit one job per key and step until every one of them is decoding (prefill done, adapters resident)."""
    done = []
    for i, (key, prompt) in enumerate(zip(keys, prompts)):
        engine.submit(Request(f"s{i}", "t", key, prompt_ids=prompt, params=SamplingParams(max_new)), done.append)
    deadline = time.monotonic() + 600
    sched = engine.scheduler
    while True:
        engine.loop.iterate()
        if done:
            raise RuntimeError(f"a job ended early: {done[0]}")
        running = sched.running
        if len(running) == len(keys) and all(s.output_ids and s.num_computed == s.num_tokens - 1 for s in running):
            return running
        if time.monotonic() > deadline:
            raise TimeoutError("sequences did not all reach decode")
        time.sleep(0.001) if not running else None


# ---- the ceiling: a plain torch decode loop ----------------------------------------------------


class Plain:
    """A minimal batch-decode loop over the engine model's weights: contiguous KV [B, Hkv, C, D] per layer."""

    def __init__(self, model, batch: int, ctx: int, capacity: int, lora: str | None, adapter_files: list[Path]):
        self.m, self.B, self.ctx = model, batch, ctx
        m = model
        on = dict(device=m.device, dtype=m.dtype)
        self.k = [torch.randn(batch, m.num_kv_heads, capacity, m.head_dim, **on) * 0.1 for _ in m.layers]
        self.v = [torch.randn(batch, m.num_kv_heads, capacity, m.head_dim, **on) * 0.1 for _ in m.layers]
        self.tokens = torch.randint(3, min(500, m.vocab_size), (batch,), device=m.device)
        self.q_dim, self.kv_dim = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        self.lora = lora
        self.w = []  # per layer: {"qkv": (A, B per slice), "o": ...}
        if lora:
            from safetensors import safe_open

            cfg = json.loads((adapter_files[0] / "adapter_config.json").read_text())
            files = adapter_files[:1] if lora == "one" else adapter_files  # one per sequence
            per_file = {}
            for path in dict.fromkeys(files):
                with safe_open(path / "adapter_model.safetensors", framework="pt") as f:
                    per_file[path] = {k: f.get_tensor(k).float() for k in f.keys()}
            scale = cfg["lora_alpha"] / cfg["r"]
            for i in range(len(m.layers)):
                layer = {}
                for group, projs in (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",))):
                    def key(p, ab):
                        return f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
                    if lora == "one":
                        t = per_file[files[0]]
                        a = torch.cat([t[key(p, "A")] for p in projs]).t().contiguous()  # [in, S*R]
                        bs = [(t[key(p, "B")] * scale).t().contiguous() for p in projs]  # [R, out_s]
                    else:  # each token's own A / scale*B, pre-gathered: [T, in, S*R], [T, R, out_s]
                        a = torch.stack([torch.cat([per_file[f][key(p, "A")] for p in projs]).t() for f in files])
                        bs = [torch.stack([(per_file[f][key(p, "B")] * scale).t() for f in files]) for p in projs]
                    layer[group] = (a.to(**on).contiguous(), [b.to(**on).contiguous() for b in bs])
                self.w.append(layer)

    def _lora(self, group: str, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        a, bs = self.w[i][group]
        r = bs[0].shape[-2]
        if self.lora == "one":
            t = x @ a
            off = 0
            for s, b in enumerate(bs):
                y[:, off:off + b.shape[1]] += t[:, s * r:(s + 1) * r] @ b
                off += b.shape[1]
        else:
            t = torch.bmm(x.unsqueeze(1), a)  # [T, 1, S*R]
            off = 0
            for s, b in enumerate(bs):
                y[:, off:off + b.shape[2]] += torch.bmm(t[:, :, s * r:(s + 1) * r], b).squeeze(1)
                off += b.shape[2]

    @staticmethod
    def _norm(x, w, eps):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    @torch.inference_mode()
    def step(self) -> None:
        m, B, pos = self.m, self.B, self.ctx
        h = m.embed[self.tokens]
        freqs = torch.full((B, 1), float(pos), device=m.device) * m.inv_freq
        ang = torch.cat((freqs, freqs), -1)
        cos = (ang.cos() * m.rope_scaling).to(m.dtype)[:, None, :]
        sin = (ang.sin() * m.rope_scaling).to(m.dtype)[:, None, :]

        def rope(x):
            x1, x2 = x.chunk(2, -1)
            return x * cos + torch.cat((-x2, x1), -1) * sin

        for i, layer in enumerate(m.layers):
            x = self._norm(h, layer.attn_norm, m.eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            if self.lora:
                self._lora("qkv", i, x, qkv)
            q, k, v = qkv.split((self.q_dim, self.kv_dim, self.kv_dim), -1)
            q = rope(q.view(B, m.num_heads, m.head_dim))
            k = rope(k.view(B, m.num_kv_heads, m.head_dim))
            self.k[i][:, :, pos] = k
            self.v[i][:, :, pos] = v.view(B, m.num_kv_heads, m.head_dim)
            o = F.scaled_dot_product_attention(q.unsqueeze(2), self.k[i][:, :, :pos + 1], self.v[i][:, :, :pos + 1],
                                               enable_gqa=True).reshape(B, -1)
            out = F.linear(o, layer.o, layer.o_bias)
            if self.lora:
                self._lora("o", i, o, out)
            h = h + out
            x = self._norm(h, layer.mlp_norm, m.eps)
            gate, up = F.linear(x, layer.gate_up, layer.gate_up_bias).chunk(2, -1)
            h = h + F.linear(m.act(gate) * up, layer.down, layer.down_bias)
        logits = F.linear(self._norm(h, m.norm, m.eps), m.lm_head)
        self.tokens = logits.argmax(-1)
        self.tokens[:1].tolist()  # wait for the step, as the engine's token copy does
        self.ctx += 1


# ---- prefill vs HF generate ----------------------------------------------------------------------


def prefill_bench(model_dir: Path, args, log) -> dict:
    from transformers import AutoModelForCausalLM

    import random

    rng = random.Random(1)
    vocab = min(500, json.loads((model_dir / "config.json").read_text())["vocab_size"])
    lens = [rng.randint(args.prefill_len - 4, args.prefill_len + 4) for _ in range(args.prefill_prompts)]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]
    width = max(lens)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    engine = make_engine(model_dir, [], len(prompts), 64, args)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=engine.dtype).eval().to(engine.device)
    ids, mask = ids.to(engine.device), mask.to(engine.device)

    def run_engine() -> float:
        done = []
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.submit(Request(f"p{time.perf_counter_ns()}-{i}", "t", None, prompt_ids=p,
                                  params=SamplingParams(1)), done.append)
        while len(done) < len(prompts):
            engine.loop.iterate()
        seconds = time.perf_counter() - t0
        assert all(c.status == "ok" and len(c.token_ids) == 1 for c in done), done[0]
        return seconds

    @torch.inference_mode()
    def run_hf() -> float:
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                          pad_token_id=0)
        out[:, -1].tolist()  # on CUDA: wait for the batch, as the engine's token copy does
        seconds = time.perf_counter() - t0
        assert out.shape == (len(prompts), width + 1)
        return seconds

    steps0 = engine.runner.steps
    run_engine(), run_hf()  # warm-up
    engine_steps = engine.runner.steps - steps0
    times = {"lorabus": [], "hf": []}
    for rep in range(args.repeats):
        order = [("lorabus", run_engine), ("hf", run_hf)]
        for name, fn in (order if rep % 2 == 0 else order[::-1]):
            times[name].append(fn())
    engine.adapters.stop(2.0)
    x = [h / e for h, e in zip(times["hf"], times["lorabus"])]
    out = {"prompts": len(prompts), "lengths": [min(lens), max(lens)], "padded_width": width,
           "engine_steps": engine_steps, "lorabus_ms": [t * 1e3 for t in times["lorabus"]],
           "hf_ms": [t * 1e3 for t in times["hf"]], "x_hf": x}
    log(f"prefill: lorabus {mmm(out['lorabus_ms'], '.1f')} ms, HF generate {mmm(out['hf_ms'], '.1f')} ms, "
        f"lorabus speed = {mmm(x)}x HF")
    return out


# ---- driver -------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="a Hugging Face model directory (e.g. SmolLM2-135M) instead of a built-in shape")
    p.add_argument("--model-shape", default="small", choices=("tiny", "small"))
    p.add_argument("--batch", type=int, default=64, help="running sequences per engine variant")
    p.add_argument("--prompt-len", type=int, default=128, help="context at the first measured step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="rounds per repeat, unhooked and hooked each")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-cache-mb", type=int, default=0, help="per engine (0: sized for batch x context)")
    p.add_argument("--prefill-prompts", type=int, default=32)
    p.add_argument("--prefill-len", type=int, default=16)
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--workdir", default="/tmp/lorabus-bench-serving")
    p.add_argument("--json")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--attention-backend", default="auto", choices=("auto", "seats", "torch", "triton"))
    p.add_argument("--versus-attention", choices=("seats", "torch", "triton"),
                   help="also run the base and 64-adapter engines with this attention, interleaved with the rest")
    p.add_argument("--adapter-mix", default="distinct", choices=("distinct", "zipf"),
                   help="the 64-adapter variant: sequence i on adapter i mod 64, or adapters drawn Zipf(1.1)")
    p.add_argument("--cuda-graphs", default=True, action=argparse.BooleanOptionalAction,
                   help="on cuda: decode steps replayed from CUDA graphs (the phase breakdown then is n/a)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    root = Path(args.workdir)
    n_adapters = min(64, args.batch)
    if args.model:
        model_dir, adapters = model_assets(root, Path(args.model), n_adapters, log=log)
    else:
        model_dir, adapters = build_assets(root, args.model_shape, n_adapters, log=log)
    adapter_dirs = [path for _, path in adapters]
    keys = [k for k, _ in adapters]
    config = json.loads((model_dir / "config.json").read_text())
    vocab = min(500, config["vocab_size"])
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
    rounds = 2 * args.steps * (args.repeats + 1) + 2
    # The first sequences to finish prefill decode while the others still prefill (512-token steps): room
    # for those tokens too, so that no sequence finishes before the last measured step.
    max_new = rounds + 2 * (args.batch * args.prompt_len // 512 + 1) + 8
    ctx_cap = args.prompt_len + max_new + 16
    kv_mb = args.kv_cache_mb or max(16, int(2 * config["num_hidden_layers"] * args.batch * ctx_cap * 1.3
                                            * config.get("num_key_value_heads", config["num_attention_heads"])
                                            * (config["hidden_size"] // config["num_attention_heads"]) * 4 / 2**20) + 8)
    log(f"step benchmark: {args.model or args.model_shape} model, batch {args.batch}, context {args.prompt_len}+, "
        f"{torch.get_num_threads()} torch thread(s), {args.repeats} repeats x {args.steps} rounds, KV {kv_mb} MiB/engine")

    engines = {
        "base": make_engine(model_dir, [], args.batch, kv_mb, args),
        "1 adapter": make_engine(model_dir, adapters[:1], args.batch, kv_mb, args),
        "64 adapters": make_engine(model_dir, adapters, args.batch, kv_mb, args),
    }
    versus = {}  # the same variants on another attention backend: before / after in one interleaved run
    if args.versus_attention:
        versus = {f"base [{args.versus_attention}]": "base", f"64 adapters [{args.versus_attention}]": "64 adapters"}
        engines[f"base [{args.versus_attention}]"] = make_engine(model_dir, [], args.batch, kv_mb, args,
                                                                 args.versus_attention)
        engines[f"64 adapters [{args.versus_attention}]"] = make_engine(model_dir, adapters, args.batch, kv_mb, args,
                                                                        args.versus_attention)
    if args.adapter_mix == "zipf":
        assignment = zipf_choice(random.Random(0), n_adapters, args.batch)
    else:
        assignment = [i % n_adapters for i in range(args.batch)]
    per_seq_keys = {"base": [None] * args.batch, "1 adapter": [keys[0]] * args.batch,
                    "64 adapters": [keys[j] for j in assignment]}
    per_seq_keys.update({name: per_seq_keys[variant] for name, variant in versus.items()})
    for name, engine in engines.items():
        t0 = time.perf_counter()
        seqs = fill(engine, per_seq_keys[name], prompts, max_new, log)
        log(f"{name}: {len(seqs)} sequences decoding, {len({s.slot for s in seqs})} distinct slots "
            f"({time.perf_counter() - t0:.1f}s)")
    model = engines["base"].model
    # the plain loops start at the engine sequences' mean context (they differ by the prefill steps they decoded in)
    ctx0 = round(statistics.fmean(s.num_tokens for s in engines["base"].scheduler.running))
    per_seq_dirs = [adapter_dirs[j] for j in assignment]
    plains = {"plain": Plain(model, args.batch, ctx0, ctx_cap, None, per_seq_dirs),
              "plain + 1 LoRA": Plain(model, args.batch, ctx0, ctx_cap, "one", per_seq_dirs),
              "plain + stacked LoRA": Plain(model, args.batch, ctx0, ctx_cap, "stacked", per_seq_dirs)}
    cuda = args.device == "cuda"
    timers = Timers(torch.cuda.synchronize if cuda else None)
    graphs = any(e.runner.decode.mode == "graphs" for e in engines.values())
    missing = ["all: CUDA graphs replay the decode step"] if graphs else install_hooks(timers, list(engines.values()))
    if missing:
        log(f"phase hooks not found (n/a): {missing}")

    runs = {**{n: (lambda e=e: e.loop.iterate()) for n, e in engines.items()}, **{n: pl.step for n, pl in plains.items()}}
    names = list(runs)
    totals = {n: [] for n in names}  # per repeat: mean unhooked step seconds
    hooked = {n: [] for n in VARIANTS}  # per repeat: phase dicts (per-step means)
    for rep in range(-1, args.repeats):  # rep -1: warm-up, discarded
        sums = defaultdict(float)
        acc = {n: defaultdict(float) for n in VARIANTS}
        calls = {n: defaultdict(int) for n in VARIANTS}
        hooked_s = defaultdict(float)
        for hook_on in (False, True):
            for r in range(args.steps):
                k = (rep * args.steps + r) % len(names)
                for name in names[k:] + names[:k]:
                    is_engine = name in engines
                    timers.on = hook_on and name in VARIANTS
                    if timers.on:
                        timers.acc, timers.calls = defaultdict(float), defaultdict(int)
                    t0 = time.perf_counter()
                    outcome = runs[name]()
                    dt = time.perf_counter() - t0
                    timers.on = False
                    if is_engine and getattr(outcome, "value", "stepped") != "stepped":
                        raise RuntimeError(f"{name}: iterate() returned {outcome}")
                    if is_engine and len(engines[name].scheduler.running) != args.batch:
                        raise RuntimeError(f"{name}: {len(engines[name].scheduler.running)} sequences running, "
                                           f"not {args.batch}")
                    if hook_on:
                        if name in VARIANTS:
                            hooked_s[name] += dt
                            for key, v in timers.acc.items():
                                acc[name][key] += v
                            for key, v in timers.calls.items():
                                calls[name][key] += v
                    else:
                        sums[name] += dt
        if rep < 0:
            continue
        for name in names:
            totals[name].append(sums[name] / args.steps)
        for name in VARIANTS:
            mean_acc = {k: v / args.steps for k, v in acc[name].items()}
            hooked[name].append(phases(mean_acc, timers.found, hooked_s[name] / args.steps, calls[name]))
    for name, engine in engines.items():
        if len(engine.scheduler.running) != args.batch:
            log(f"warning: {name} ended with {len(engine.scheduler.running)} running sequences")
        engine.adapters.stop(2.0)
    ctx_end = plains["plain"].ctx

    report = {"machine": machine(), "cpu_model": cpu_model(), "attention": engines["base"].model.attention.name,
              "config": vars(args), "context": [ctx0, ctx_end],
              "missing_hooks": missing, "totals_ms": {n: [v * 1e3 for v in vs] for n, vs in totals.items()},
              "phases_ms": {n: [{k: (None if v is None else v * 1e3) for k, v in d.items()} for d in ds]
                            for n, ds in hooked.items()}}
    report["x_ceiling"] = {v: [e / c for e, c in zip(totals[v], totals[CEILINGS[v]])] for v in VARIANTS}
    report["x_plain"] = {v: [e / c for e, c in zip(totals[v], totals["plain"])] for v in VARIANTS}
    report["versus"] = {name: {"ms": [t * 1e3 for t in totals[name]],
                               "x_ceiling": [e / c for e, c in zip(totals[name], totals[CEILINGS[variant]])]}
                        for name, variant in versus.items()}
    # throughput with 64 adapters over throughput with one, paired per repeat: the engine's, and the ceiling's
    # (the fastest loop for one adapter, dense LoRA, over the ideal loop for 64: pre-stacked per-token LoRA)
    report["x_64_vs_1"] = {
        "engine": [one / many for one, many in zip(totals["1 adapter"], totals["64 adapters"])],
        "ceiling": [one / many for one, many in zip(totals["plain + 1 LoRA"], totals["plain + stacked LoRA"])]}
    if not args.no_prefill:
        report["prefill"] = prefill_bench(model_dir, args, log)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


def markdown(report: dict) -> str:
    lines = []
    cfg = report["config"]
    reps = cfg["repeats"]
    mix = ", 64-adapter variant's adapters drawn Zipf(1.1)" if cfg.get("adapter_mix") == "zipf" else ""
    lines.append(f"**decode step, {cfg['batch']} running sequences{mix}, context {report['context'][0]}→{report['context'][1]}**, "
                 f"{cfg['threads']} torch thread(s), {report['cpu_model']}, {report['attention']} attention; "
                 f"ms per step, median [min..max] of {reps} repeats "
                 f"(each the mean of {cfg['steps']} interleaved steps); phases from hooked steps")
    lines.append("")
    lines.append("| ms per step | " + " | ".join(VARIANTS) + " |")
    lines.append("|---|" + "---:|" * len(VARIANTS))
    rows = list(report["phases_ms"][VARIANTS[0]][0].keys())
    for row in rows:
        cells = [mmm([d[row] for d in report["phases_ms"][v]]) for v in VARIANTS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("| **step (no hooks)** | " + " | ".join(f"**{mmm(report['totals_ms'][v])}**" for v in VARIANTS) + " |")
    lines.append("| ceiling (plain torch loop) | " + " | ".join(
        f"{mmm(report['totals_ms'][CEILINGS[v]])} ({CEILINGS[v]})" for v in VARIANTS) + " |")
    lines.append("| **engine step / ceiling** | " + " | ".join(f"**{mmm(report['x_ceiling'][v])}x**" for v in VARIANTS) + " |")
    lines.append("| engine step / plain loop (no LoRA) | " + " | ".join(f"{mmm(report['x_plain'][v])}x" for v in VARIANTS) + " |")
    lines.append("")
    for name, figures in report.get("versus", {}).items():
        lines.append(f"- interleaved with these, {name}: {mmm(figures['ms'])} ms per step, "
                     f"{mmm(figures['x_ceiling'])}x its ceiling")
    if report.get("versus"):
        lines.append("")
    if report["missing_hooks"]:
        lines.append(f"Hooks not found (phases n/a): {', '.join(report['missing_hooks'])}")
        lines.append("")
    pf = report.get("prefill")
    if pf:
        lines.append(f"**batched prefill**: {pf['prompts']} prompts of {pf['lengths'][0]}-{pf['lengths'][1]} tokens to "
                     f"the first token (HF: one left-padded batch of width {pf['padded_width']}), {report['cpu_model']}; "
                     f"engine steps per batch: {pf['engine_steps']}; median [min..max] of {len(pf['hf_ms'])} repeats")
        lines.append("")
        lines.append("| lorabus ms | HF generate(max_new_tokens=1) ms | lorabus speed / HF |")
        lines.append("|---:|---:|---:|")
        lines.append(f"| {mmm(pf['lorabus_ms'], '.1f')} | {mmm(pf['hf_ms'], '.1f')} | {mmm(pf['x_hf'])}x |")
        lines.append("")
    lines.append("**goals** (issue 11; medians of the paired repeats)")
    lines.append("")
    for line in goals(report):
        lines.append(f"- {line}")
    lines.append("")
    lines.append(f"wall time {report['wall_s']} s")
    return "\n".join(lines)


def goals(report: dict) -> list[str]:
    """The issue-11 step targets, and the ceiling for the serving target "64 adapters >= 0.85x of one"."""
    def verdict(values, ok) -> str:
        return "met" if ok(statistics.median(values)) else "MISSED"

    x64, xbase, x = report["x_ceiling"]["64 adapters"], report["x_ceiling"]["base"], report["x_64_vs_1"]
    out = [f"64-adapter step / plain loop with stacked LoRA = {mmm(x64)}x (target <= 1.25x): "
           f"{verdict(x64, lambda v: v <= 1.25)}",
           f"base-only step / plain loop = {mmm(xbase)}x (target <= 1.15x): {verdict(xbase, lambda v: v <= 1.15)}",
           f"engine: step throughput, 64 adapters / 1 adapter = {mmm(x['engine'])}x (target >= 0.85x): "
           f"{verdict(x['engine'], lambda v: v >= 0.85)}",
           f"ceiling: ideal-LoRA loop, 64 adapters / 1 adapter = {mmm(x['ceiling'])}x (plain + 1 LoRA step over "
           f"plain + stacked LoRA step: no engine can beat this ratio on this machine at this batch)"]
    pf = report.get("prefill")
    if pf:
        out.append(f"batched prefill / HF generate = {mmm(pf['x_hf'])}x (target >= 1.0x): "
                   f"{verdict(pf['x_hf'], lambda v: v >= 1.0)}")
    return out


if __name__ == "__main__":
    main()
