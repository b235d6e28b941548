"""What an operator gets wrong gets one line on stderr naming the flag (or variable), the value and what to
do, and a non-zero exit (2 for usage errors): never a traceback, never a model hub. Run as `python -m
lorabus.worker.cli`, a subprocess, as an operator would (the environment and --help included)."""

import argparse
import asyncio
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from importlib.metadata import version

import pytest

from lorabus.schemas import error_result
from lorabus.worker.cli import build_parser, main
from lorabus.worker.cli.produce import _error_summary
from lorabus.worker.service import StartupError, Worker
from helpers import running_worker, worker_config

UNREACHABLE = "127.0.0.1:1"  # nothing listens there: any test reaching Kafka fails fast instead of passing


def lorabus_process(*args: str, env: dict | None = None, stdin: str | None = None, timeout: float = 120):
    """`python -m lorabus.worker.cli ARGS` as an operator runs it: (exit code, stdout, stderr, seconds)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lorabus.worker.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "LORABUS_BOOTSTRAP_SERVERS": UNREACHABLE,
                                                           **(env or {})})
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


@pytest.fixture
def lorabus(capfd, monkeypatch):
    """main(ARGS) in this process (a subprocess costs seconds of imports each): (exit code, stdout, stderr,
    seconds); `env` is set for the call, `stdin` is what the command reads."""
    root = logging.getLogger()
    saved = list(root.handlers), root.level

    def run(*args: str, env: dict | None = None, stdin: str | None = None):
        with monkeypatch.context() as patch:
            for name, value in {"LORABUS_BOOTSTRAP_SERVERS": UNREACHABLE, **(env or {})}.items():
                patch.setenv(name, value)
            if stdin is not None:
                patch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
            capfd.readouterr()
            started = time.monotonic()
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse: --help, --version, usage errors
                code = exit_.code
            finally:  # main() set up logging for the command
                root.handlers[:] = saved[0]
                root.setLevel(saved[1])
            out, err = capfd.readouterr()
            return code, out, err, time.monotonic() - started

    return run


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_missing_model_path_is_refused_at_once():
    rc, _, err, took = lorabus_process("worker", "--model", "/nonexistent")
    assert rc == 2 and one_line(err) == "lorabus worker: --model: /nonexistent: no such directory or .gguf file"
    assert took < 30  # no model hub (it took 56 s to fail there)


def test_unknown_model_name_lists_the_known_ones(lorabus):
    rc, _, err, _ = lorabus("worker", "--model", "no-such-model")
    assert rc == 2
    assert one_line(err) == ("lorabus worker: --model: no-such-model: not a known model name (known: "
                             "smollm2-135m-instruct) and no such directory or .gguf file here")


def test_model_directory_without_config(lorabus, tmp_path):
    rc, _, err, _ = lorabus("worker", "--model", str(tmp_path))
    assert rc == 2
    assert one_line(err) == f"lorabus worker: --model {tmp_path}: a directory without config.json, not a Hugging " \
                            "Face model directory"


def test_unsupported_model_type(lorabus, tiny_model, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "gpt2")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    rc, _, err, _ = lorabus("worker", "--model", str(model), "--metrics-port", "-1")
    assert rc == 2
    assert one_line(err) == (f"lorabus worker: --model {model}: config.json model_type 'gpt2' is not supported; "
                             "serve a model of one of: llama, mistral, phi3, qwen2")


def test_taken_metrics_port(lorabus, tiny_model):
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        rc, _, err, _ = lorabus("worker", "--model", str(tiny_model), "--metrics-port", str(port))
    assert rc == 2
    assert one_line(err) == (f"lorabus worker: --metrics-port {port}: cannot listen (Address already in use); stop "
                             "what holds it or pick another port (0 = any free port, -1 = off)")


async def test_worker_refuses_a_port_taken_after_the_cli_checked_it(tiny_model):
    """The CLI probes the port before the model loads; the worker's own bind (a port taken meanwhile, or a
    Worker run without the CLI) fails with the same one line, before it touches Kafka."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        worker = Worker(worker_config(UNREACHABLE, tiny_model, metrics_port=port, metrics_host="127.0.0.1"))
        with pytest.raises(StartupError) as error:
            await worker.run()
    assert str(error.value) == (f"--metrics-port {port}: cannot listen (Address already in use); stop what holds "
                                "it or pick another port (0 = any free port, -1 = off)")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device(lorabus, device):
    rc, _, err, _ = lorabus("worker", "--device", device)
    assert rc == 2
    assert one_line(err) == (f"lorabus worker: --device {device!r}: not a device lorabus runs on; "
                             "use cpu, cuda, cuda:N or auto")


def test_bad_environment_value_spares_help_and_names_the_variable(lorabus):
    env = {"LORABUS_MAX_LORAS": "abc"}
    rc, out, err, _ = lorabus_process("--help", env=env)  # the parser is built whole for any command
    assert rc == 0 and "usage: lorabus" in out and "Traceback" not in err
    rc, out, err, _ = lorabus("worker", "--help", env=env)
    assert rc == 0 and "--max-loras" in out and "LORABUS_MAX_LORAS" in out and err == ""
    rc, _, err, _ = lorabus_process("worker", env=env)
    assert rc == 2
    assert one_line(err) == "lorabus worker: LORABUS_MAX_LORAS='abc' is not a whole number (sets --max-loras); " \
                            "fix or unset it"
    rc, _, err, _ = lorabus("worker", env={"LORABUS_EXACTLY_ONCE": "maybe"})
    assert rc == 2 and "LORABUS_EXACTLY_ONCE='maybe' is not a boolean" in one_line(err)
    # A flag given on the command line wins over the bad variable: the next problem is the one reported.
    rc, _, err, _ = lorabus("worker", "--max-loras", "2", "--device", "tpu", env=env)
    assert rc == 2 and one_line(err).startswith("lorabus worker: --device 'tpu'")


@pytest.mark.parametrize("flag,value,message", [
    ("--max-warmups", "0", "--max-warmups 0: use 1 or more (a worker must load what serves)"),
    ("--ready-max-loop-lag-ms", "0", "--ready-max-loop-lag-ms 0: use 1 or more"),
])
def test_start_up_settings_out_of_range(lorabus, flag, value, message):
    rc, _, err, _ = lorabus("worker", flag, value)
    assert rc == 2 and one_line(err) == f"lorabus worker: {message}"


def test_bad_log_format_and_level(lorabus):
    rc, _, err, _ = lorabus("worker", "--log-format", "xml")
    assert rc == 2 and one_line(err) == "lorabus worker: --log-format 'xml': not a log format; use text or json"
    rc, _, err, _ = lorabus("--log-level", "LOUD", "status")
    assert rc == 2 and "unknown log level 'LOUD'" in one_line(err)


def test_version(lorabus):
    rc, out, err, _ = lorabus("--version")
    assert rc == 0 and out.strip() == f"lorabus {version('lorabus')}", (out, err)


def _actions(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # the one-line help of each subcommand
                yield f"{path} {choice.dest}", choice
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")


def test_every_argument_of_every_command_has_help():
    missing = [f"{path}: {action.option_strings or action.dest}" for path, action in _actions(build_parser(), "lorabus")
               if not (action.help or "").strip() or action.help == argparse.SUPPRESS]
    assert not missing, missing
    commands = {path for path, _ in _actions(build_parser(), "lorabus")}
    assert {"lorabus worker", "lorabus produce", "lorabus rollout route", "lorabus model fetch"} <= commands


@pytest.mark.parametrize("lines, message", [
    ('{"id": "a", "tenant": "t"}\n\n{"id": "b",, }\n',
     "lorabus produce: stdin line 3, column 12: not JSON (Expecting property name enclosed in double quotes); "
     "one job object per line"),
    ('{"id": "a", "tenant": "t"}\n[1, 2]\n', "lorabus produce: stdin line 2: a JSON array, not a job object; "
                                            "one job object per line"),
    ('"just text"\n', "lorabus produce: stdin line 1: a JSON string, not a job object; one job object per line"),
    ('{"tenant": "t"}\n', 'lorabus produce: stdin line 1: the job has no string "id" to wait for'),
])
def test_produce_names_the_bad_line(lorabus, lines, message):
    rc, out, err, _ = lorabus("produce", stdin=lines)
    assert rc == 2 and out == "" and one_line(err) == message


def test_produce_missing_file(lorabus):
    rc, _, err, _ = lorabus("produce", "/no/such/jobs.jsonl")
    assert rc == 2 and one_line(err) == "lorabus produce: /no/such/jobs.jsonl: No such file or directory"


def test_error_summary_counts_codes_and_ignores_ok():
    jobs = [(f"j{i}", b"{}") for i in range(5)]
    results = {"j0": [error_result("j0", "invalid_job", "x", "w")], "j1": [error_result("j1", "forbidden", "x", "w")],
               "j2": [error_result("j2", "invalid_job", "x", "w")]}
    assert _error_summary(jobs, results) == "3 of 5 jobs answered with errors: invalid_job ×2, forbidden ×1"
    assert _error_summary(jobs, {}) is None


async def test_produce_exits_1_when_results_are_errors_or_missing(kafka, tiny_model, tmp_path):
    config = worker_config(kafka, tiny_model)
    env = {"LORABUS_BOOTSTRAP_SERVERS": kafka, "LORABUS_JOBS_TOPIC": config.jobs_topic,
           "LORABUS_RESULTS_TOPIC": config.results_topic}
    jobs = [{"id": "ok-1", "tenant": "t", "prompt_ids": [5, 6], "max_new_tokens": 2},
            {"id": "bad-1", "tenant": "t", "adapter": "nope", "prompt_ids": [5], "max_new_tokens": 2},
            {"id": "bad-2", "tenant": "t", "prompt_ids": [5], "max_new_tokens": 0}]
    source = tmp_path / "jobs.jsonl"
    source.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    async with running_worker(config):
        rc, out, err, _ = await asyncio.to_thread(lorabus_process, "produce", "--key", "id", str(source),
                                                  "--timeout", "60", env=env)
    assert rc == 1, err
    assert {json.loads(line)["id"] for line in out.splitlines()} == {"ok-1", "bad-1", "bad-2"}
    assert one_line(err) == "lorabus produce: 2 of 3 jobs answered with errors: adapter_not_found ×1, invalid_job ×1"
    # The worker has stopped: nobody answers.
    rc, _, err, _ = lorabus_process("produce", "--key", "id", "--timeout", "2", stdin=json.dumps(jobs[0]) + "\n",
                                    env=env)
    assert rc == 1
    assert "lorabus produce: 1 of 1 jobs had no result within 2 s (--timeout): ok-1" in err and "Traceback" not in err
