"""Adapter-aware continuous batching over one base model: the engine, its scheduler, adapter tiers.

Builds on `kernels` for the LoRA math; knows nothing of Kafka. The worker talks to `Engine` only.
"""

from lorabus.scheduler.adapter_manager import MIX_PREFIX, AdapterSpec, mix_key, mix_spec
from lorabus.scheduler.config import EngineConfig
from lorabus.scheduler.engine import Engine
from lorabus.scheduler.requests import Completion, Request, SamplingParams

__all__ = ["MIX_PREFIX", "AdapterSpec", "Completion", "Engine", "EngineConfig", "Request", "SamplingParams", "mix_key",
           "mix_spec"]
