"""Adapter-aware continuous batching over one base model: the engine, its scheduler, adapter tiers.

Builds on `kernels` for the LoRA math; knows nothing of Kafka. The worker talks to `Engine` only.
"""

from lorabus.scheduler.adapter_manager import MIX_PREFIX, AdapterSpec, mix_key, mix_spec
from lorabus.scheduler.config import EngineConfig
from lorabus.scheduler.engine import Engine
from lorabus.scheduler.grammar import OutputFormat
from lorabus.scheduler.requests import ChoiceOutput, Completion, Partial, Request, SamplingParams, TokenLogprob

__all__ = ["MIX_PREFIX", "AdapterSpec", "ChoiceOutput", "Completion", "Engine", "EngineConfig", "OutputFormat", "Partial",
           "Request", "SamplingParams", "TokenLogprob", "mix_key", "mix_spec"]
