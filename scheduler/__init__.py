"""Adapter-aware continuous batching over one base model: the engine, its scheduler, adapter tiers.

Builds on `kernels` for the LoRA math; knows nothing of Kafka. The worker talks to `Engine` only.
"""

from scheduler.adapter_manager import AdapterSpec
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.requests import Completion, Request, SamplingParams

__all__ = ["AdapterSpec", "Completion", "Engine", "EngineConfig", "Request", "SamplingParams"]
