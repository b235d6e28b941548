"""Adapter-aware continuous batching over one base model: the engine, its scheduler, adapter tiers.

Builds on `kernels` for the LoRA math; knows nothing of Kafka. The worker talks to `Engine` only.
"""

from scheduler.config import EngineConfig
from scheduler.core import SamplingParams
from scheduler.engine import AdapterSpec, Completion, Engine, GenerationRequest

__all__ = ["AdapterSpec", "Completion", "Engine", "EngineConfig", "GenerationRequest", "SamplingParams"]
