"""Shared fixtures: the real Kafka broker (started once per session through deploy/local-kafka unless
KAFKA_BOOTSTRAP_SERVERS names one), the tiny base model and PEFT-made adapters, the real SmolLM2 model
(fetched once per machine and cached), and a worker runner."""

import os

# The Triton interpreter must be chosen before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Child Pythons (`python -m lorabus.worker.cli`, `python -c ...`) run from the repository root; without this
# they would put it first on sys.path, where our kernels/ shadows Hugging Face's `kernels` package.
os.environ["PYTHONSAFEPATH"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from helpers import PrivateBroker, make_peft_adapter  # noqa: E402
from s3_store import s3_fixture  # noqa: E402
from lorabus.worker.aiokafka_compat import use_python_record_builder  # noqa: E402
from lorabus.worker.model_store import fetch_model  # noqa: E402
from lorabus.worker.testing import build_tiny_model  # noqa: E402

# Before any producer exists: test producers may send header keys that are not UTF-8 (helpers.RawHeaderKey).
use_python_record_builder()

# A real S3-compatible store (deploy/local-s3: S3Proxy) of the test's own, with an empty bucket "adapters";
# a test may stop() and restart() it (same port and data) for outage checks.
s3 = s3_fixture()


@pytest.fixture
def store(s3, monkeypatch):
    """`s3` with its keys in boto3's chain (the environment), as operators hand them to in-process workers."""
    for name, value in s3.credentials_env().items():
        monkeypatch.setenv(name, value)
    return s3


@pytest.fixture(scope="session")
def kafka(tmp_path_factory) -> str:
    """Bootstrap address of a real Apache Kafka broker."""
    existing = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if existing:
        yield existing
        return
    broker = PrivateBroker(tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop(check=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="session")
def peft_adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Three PEFT LoRA adapters with non-zero B, different ranks, alphas, scaling rules and targets."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "all-r8-rslora": dict(r=8, lora_alpha=16, use_rslora=True,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        "mlp-r16-patterns": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj", "o_proj"],
                                 rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 64}),
    }
    return {name: make_peft_adapter(tiny_model, root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(specs.items())}


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, converted: downloaded and converted once per machine (into
    ${LORABUS_CACHE:-~/.cache/lorabus}/models), then cached."""
    return fetch_model("smollm2-135m-instruct")


def pytest_collection_modifyitems(items):
    """Every test that uses the broker is a `kafka` test, so `pytest -m "not kafka"` is the fast suite.
    Tests that start brokers of their own carry the mark explicitly."""
    for item in items:
        if "kafka" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)
