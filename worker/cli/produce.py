"""`lorabus produce`: send the jobs of a JSONL file (or stdin) and print their results; exit 1 when a
result is missing or an error. With --stream, jobs stream (unless they say otherwise) and each partial
result is printed as it arrives, one JSON line of its job id, choice index and new text."""

from __future__ import annotations

import asyncio
import json
import sys

from lorabus.worker.cli.broker import _kafka_errors, _why
from lorabus.worker.cli.flags import UsageError, _client_flags, _security_from

_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _read_jobs(file: str, stream: bool = False) -> tuple[list[tuple[str, bytes]], list[dict]]:
    """(job id, record value) pairs and the parsed jobs of a JSONL file ("-": stdin); UsageError names the
    file's line (counting blank lines) and what is wrong with it. `stream`: a job that does not set
    "stream" is sent with "stream": true."""
    try:
        source = open(file, "rb") if file != "-" else sys.stdin.buffer
    except OSError as exc:
        raise UsageError(f"{file}: {exc.strerror or exc}") from None
    jobs, parsed = [], []
    with source:
        for number, raw in enumerate(source, 1):
            where = f"{'stdin' if file == '-' else file} line {number}"
            try:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                job = json.loads(line)
            except UnicodeDecodeError as exc:
                raise UsageError(f"{where}: not UTF-8 (byte {exc.start + 1})") from None
            except json.JSONDecodeError as exc:  # its own "line 1" means the first line of this one line
                raise UsageError(f"{where}, column {exc.colno}: not JSON ({exc.msg}); one job object per line") from None
            if not isinstance(job, dict):
                raise UsageError(f"{where}: a JSON {_JSON_KINDS.get(type(job), 'value')}, not a job object; "
                                 "one job object per line")
            if not isinstance(job.get("id"), str):
                raise UsageError(f"{where}: the job has no string \"id\" to wait for")
            if stream and "stream" not in job:
                job["stream"] = True
                line = json.dumps(job, ensure_ascii=False)
            jobs.append((job["id"], line.encode()))
            parsed.append(job)
    return jobs, parsed


def _error_summary(jobs: list[tuple[str, bytes]], results: dict) -> str | None:
    """"3 of 10 jobs answered with errors: invalid_job ×2, forbidden ×1", or None when every answer is ok."""
    codes: dict[str, int] = {}
    for job_id, _ in jobs:
        answers = results.get(job_id)
        if answers and answers[0].status != "ok":
            code = answers[0].error.code if answers[0].error else answers[0].status
            codes[code] = codes.get(code, 0) + 1
    if not codes:
        return None
    counts = ", ".join(f"{code} ×{n}" for code, n in sorted(codes.items(), key=lambda item: (-item[1], item[0])))
    return f"{sum(codes.values())} of {len(jobs)} jobs answered with errors: {counts}"


def cmd_produce(args) -> int:
    from lorabus.worker.affinity import AffinityKeyer, job_key
    from lorabus.worker.client import run_jobs, topic_partitions

    try:
        jobs, parsed = _read_jobs(args.file, args.stream)
    except UsageError as exc:
        print(f"lorabus produce: {exc}", file=sys.stderr)
        return 2
    keys = None
    if args.key == "affinity":  # one adapter's jobs on few partitions (worker/affinity.py)
        try:
            partitions = len(asyncio.run(topic_partitions(args.bootstrap_servers, args.jobs_topic,
                                                          security=_security_from(args))))
        except _kafka_errors() as exc:
            print(f"lorabus produce: cannot read the partitions of {args.jobs_topic}: {_why(exc)}", file=sys.stderr)
            return 1
        keyer = AffinityKeyer(partitions)
        keys = [job_key(job, keyer) for job in parsed]
    try:
        results = asyncio.run(run_jobs(args.bootstrap_servers, args.jobs_topic, args.results_topic, jobs, args.timeout,
                                       on_result=lambda r: print(json.dumps(_plain(r)), flush=True),
                                       on_partial=_print_partial if args.stream else None, keys=keys,
                                       security=_security_from(args)))
    except _kafka_errors() as exc:
        print(f"lorabus produce: cannot send to {args.jobs_topic} / read {args.results_topic}: {_why(exc)}",
              file=sys.stderr)
        return 1
    missing = [job_id for job_id, _ in jobs if job_id not in results]
    if missing:
        print(f"lorabus produce: {len(missing)} of {len(jobs)} jobs had no result within {args.timeout:g} s "
              f"(--timeout): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}", file=sys.stderr)
    errors = _error_summary(jobs, results)
    if errors:
        print(f"lorabus produce: {errors}", file=sys.stderr)
    return 1 if missing or errors else 0


def _print_partial(partial) -> None:
    print(json.dumps({"id": partial.id, "status": "partial", "index": partial.index, "text": partial.text},
                     ensure_ascii=False), flush=True)


def _plain(result) -> dict:
    import msgspec

    return msgspec.to_builtins(result)


def add_produce_command(sub) -> None:
    produce = sub.add_parser("produce", help="send jobs (JSONL file or stdin) and print their results")
    _client_flags(produce, "jobs_topic", "results_topic")
    produce.add_argument("file", nargs="?", default="-", help="JSONL file of jobs, one object per line (default: stdin)")
    produce.add_argument("--timeout", type=float, default=120.0,
                         help="seconds to wait for every result (default 120); exit 1 if any is missing or an error")
    produce.add_argument("--key", choices=("affinity", "id"), default="affinity",
                         help="record keys: 'affinity' keeps one adapter's jobs on few partitions (salted by its "
                              "traffic share), 'id' spreads jobs by job id [affinity]")
    produce.add_argument("--stream", action="store_true",
                         help="stream the jobs (those that do not set \"stream\") and print each partial result as "
                              "it arrives: {\"id\", \"status\": \"partial\", \"index\", \"text\"}, the text "
                              "new since the job's previous partial of that choice")
    produce.set_defaults(func=cmd_produce)
