"""A worker and the CLI on a secured cluster: a broker of this module's own (deploy/local-kafka with a
SASL_PLAINTEXT/SCRAM listener, user alice created by Kafka's StorageTool, and a TLS listener whose certificate
a CA made here with openssl signed), every client pointed at one of those listeners only. The worker answers
jobs sent with `lorabus produce`; a wrong password or an unknown CA fails fast, in one line."""

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabus.worker.client import run_jobs
from lorabus.worker.kafka_security import KafkaSecurity
from helpers import committed_lag, running_worker, worker_config

pytestmark = pytest.mark.kafka  # starts a broker of its own

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "local-kafka"
# What the broker logs when a client fails to log in, or talks plain Kafka to the SASL listener.
REFUSED = ("Failed authentication", "during SASL handshake")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def broker_identity(d: Path) -> Path:
    """A CA (d/ca.pem) and the broker's key + certificate for 127.0.0.1, signed by it, in one PEM file."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=lorabus-test-ca", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
            "-subj", "/CN=localhost", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "broker.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)
    identity = d / "broker-identity.pem"
    identity.write_text((d / "broker.key").read_text() + (d / "broker.pem").read_text())
    return identity


@pytest.fixture(scope="module")
def scram_broker(tmp_path_factory):
    """{plain, sasl, ssl: bootstrap addresses, password: alice's, ca: the TLS listener's CA, log: server.log}."""
    data, pki = tmp_path_factory.mktemp("kafka-sasl"), tmp_path_factory.mktemp("pki")
    password = secrets.token_hex(8)
    subprocess.run([sys.executable, str(SCRIPT), "start", "--port", "0", "--data", str(data), "--sasl-port", "0",
                    "--scram-user", f"alice={password}", "--ssl-port", "0", "--ssl-pem", str(broker_identity(pki))],
                   check=True, stdout=subprocess.PIPE, timeout=600)
    info = json.loads((data / "broker.json").read_text())
    try:
        yield {"plain": info["bootstrap"], "sasl": info["sasl_bootstrap"], "ssl": info["ssl_bootstrap"],
               "password": password, "ca": pki / "ca.pem", "log": data / "server.log"}
    finally:
        subprocess.run([sys.executable, str(SCRIPT), "stop", "--data", str(data)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=180)


def refusals(log: Path) -> int:
    return sum(line.count(text) for line in log.read_text(errors="replace").splitlines() for text in REFUSED)


async def lorabus(*args, env: dict, timeout: float = 180) -> tuple[int, str, str, float]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lorabus.worker.cli", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, **env})
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - started


def cli_env(broker, password: str, **topics) -> dict:
    """The CLI's settings as LORABUS_* variables (the password too: never on a command line)."""
    return {"LORABUS_BOOTSTRAP_SERVERS": broker["sasl"], "LORABUS_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "LORABUS_SASL_MECHANISM": "SCRAM-SHA-512", "LORABUS_SASL_USERNAME": "alice",
            "LORABUS_SASL_PASSWORD": password, **{f"LORABUS_{k.upper()}": v for k, v in topics.items()}}


async def test_worker_and_cli_over_scram(scram_broker, tiny_model, peft_adapters, tmp_path):
    refused_before = refusals(scram_broker["log"])
    # The worker logs in with SCRAM-SHA-256, the CLI with SCRAM-SHA-512: both mechanisms work.
    security = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-256", "alice", scram_broker["password"])
    config = worker_config(scram_broker["sasl"], tiny_model, security=security, worker_id="w-scram")
    env = cli_env(scram_broker, scram_broker["password"], control_topic=config.control_topic,
                  status_topic=config.status_topic)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(j) + "\n" for j in [
        {"id": "s-0", "tenant": "acme", "adapter": "ner", "prompt": "hello", "max_new_tokens": 2},
        {"id": "s-1", "tenant": "acme", "prompt_ids": [5, 6], "max_new_tokens": 2}]))
    async with running_worker(config):
        rc, _, err, _ = await lorabus("publish", "ner", "v1", str(peft_adapters["qv-r4"]), env=env)
        assert rc == 0, err
        rc, out, err, _ = await lorabus("produce", "--jobs-topic", config.jobs_topic, "--results-topic",
                                        config.results_topic, str(jobs), env=env)
        assert rc == 0, err
        results = {r["id"]: r for r in map(json.loads, out.splitlines())}
        assert results["s-0"]["status"] == "ok" and results["s-0"]["adapter_version"] == "v1"
        assert results["s-1"]["status"] == "ok" and len(results["s-1"]["token_ids"]) == 2
        rc, out, err, _ = await lorabus("status", "--json", env=env)
        assert rc == 0, err
        assert json.loads(out)["workers"]["w-scram"]["live"]  # the status reporter's producer logged in too
        deadline = time.monotonic() + 20
        while await committed_lag(scram_broker["plain"], config.group_id, config.jobs_topic) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await committed_lag(scram_broker["plain"], config.group_id, config.jobs_topic) == 0
    # No client of the worker or the CLI fell back to plain text or failed its login on the SASL listener.
    assert refusals(scram_broker["log"]) == refused_before


async def test_wrong_password_fails_fast_in_one_line(scram_broker, tiny_model, tmp_path):
    env = cli_env(scram_broker, "not-" + scram_broker["password"])
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "x", "tenant": "acme", "prompt": "hi"}) + "\n")
    rc, out, err, seconds = await lorabus("produce", "--key", "id", str(jobs), env=env, timeout=60)
    assert rc == 1 and out == ""
    assert seconds < 30
    assert err.count("\n") == 1 and err.startswith("lorabus produce: "), err
    assert "SaslAuthenticationFailed" in err and "SCRAM-SHA-512" in err, err

    rc, _, err, _ = await lorabus("status", env=env, timeout=60)
    assert rc == 1 and err.count("\n") == 1 and "SaslAuthenticationFailed" in err, err

    worker_env = {**env, "LORABUS_MODEL": str(tiny_model), "LORABUS_METRICS_PORT": "-1", "LORABUS_KV_CACHE_MB": "64"}
    rc, _, err, seconds = await lorabus("worker", env=worker_env, timeout=120)
    assert rc == 1 and "Traceback" not in err, err
    last = err.splitlines()[-1]  # the worker's own log lines come before it
    assert last.startswith("lorabus worker: ") and "SaslAuthenticationFailed" in last, err


async def test_worker_and_client_over_tls(scram_broker, tiny_model):
    security = KafkaSecurity("SSL", ssl_cafile=str(scram_broker["ca"]))
    config = worker_config(scram_broker["ssl"], tiny_model, security=security, exactly_once=True)  # + the outbox
    jobs = [(f"t-{i}", json.dumps({"id": f"t-{i}", "tenant": "acme", "prompt_ids": [5, 6 + i],
                                   "max_new_tokens": 2}).encode()) for i in range(2)]
    async with running_worker(config):
        results = await run_jobs(config.bootstrap_servers, config.jobs_topic, config.results_topic, jobs, 120,
                                 isolation_level="read_committed", security=security)
    assert sorted(results) == ["t-0", "t-1"]
    assert all(r.status == "ok" and len(r.token_ids) == 2 for (r,) in results.values())

    # Without the CA the system's CAs do not know the broker's certificate: refused, in one line.
    env = {"LORABUS_BOOTSTRAP_SERVERS": scram_broker["ssl"], "LORABUS_SECURITY_PROTOCOL": "SSL"}
    rc, _, err, seconds = await lorabus("status", env=env, timeout=60)
    assert rc == 1 and seconds < 30
    assert err.count("\n") == 1 and "CERTIFICATE_VERIFY_FAILED" in err, err
