"""The prefix cache through the real broker and worker: jobs on one long prompt under an adapter and the base
model, sent again; the repeats hit what the first ones computed (never across adapters), the worker's
Prometheus counters show it, and every answer equals PEFT's greedy tokens."""

from helpers import OracleJobs, PeftOracle, running_worker, worker_config
from lorabus.scheduler import EngineConfig
from lorabus.schemas import AdapterPublish
from lorabus.worker.client import publish_control

BS = 4  # tokens per KV block: the prompt spans several
PROMPT = "summarize: the meeting moved to thursday at noon and jobs arrive on kafka"
QV = "qv-r4"


async def test_repeated_prompts_hit_the_cache_and_the_counters_show_it(kafka, tiny_model, peft_adapters):
    oracle = PeftOracle(tiny_model)
    config = worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64, kv_block_size=BS))
    async with running_worker(config) as worker:
        await publish_control(kafka, config.control_topic, [AdapterPublish(QV, "v1", str(peft_adapters[QV]))])
        jobs = OracleJobs(kafka, config, oracle, {f"{QV}@v1": peft_adapters[QV]}, PROMPT, max_new=4, timeout_s=120)
        shareable = (len(jobs.ids) - 1) // BS * BS
        assert shareable >= 3 * BS, "the prompt must span several blocks"
        registry = worker.metrics.registry

        def counter(name: str) -> float:
            return registry.get_sample_value(f"lorabus_prefix_cache_{name}_tokens_total")

        first = await jobs.run([f"{QV}@v1"])
        # Looked up: the shareable blocks of each job's prompt (an adapter's one-token warm-up has none).
        assert (counter("queried"), counter("hit")) == (shareable, 0)
        second = await jobs.run([None])  # the same prompt on the base model: its own identity, no hit
        assert counter("hit") == 0
        again = await jobs.run([f"{QV}@v1", None])
        assert counter("hit") == 2 * shareable
        assert counter("queried") == 4 * shareable
        cached = registry.get_sample_value("lorabus_engine_kv_blocks_cached")
    assert cached == 2 * shareable // BS
    for result, weights_of in zip(first + second + again, [f"{QV}@v1", None, f"{QV}@v1", None]):
        jobs.check_ok(result, weights_of)
