"""Wire contract v1: strict decoding, header fill-in, error codes, and the control union."""

import json

import msgspec
import pytest

from lorabus.schemas import (ERROR_CODES, AdapterActivate, AdapterPublish, JobError, JobResult, decode_control, decode_job,
                     decode_result, encode, error_result, parse_adapter_ref)


def _raw(**fields):
    return json.dumps({"id": "j-1", "tenant": "acme", "prompt": "hi", **fields}).encode()


def test_valid_job_defaults():
    job = decode_job(_raw(adapter="fin-ner@v2"))
    assert (job.max_new_tokens, job.temperature, job.top_p, job.top_k, job.stop) == (64, 0.0, 1.0, 0, [])
    assert parse_adapter_ref(job.adapter).version == "v2"
    assert parse_adapter_ref("fin-ner").version is None


@pytest.mark.parametrize("body,fragment", [
    (b"not json", "JSON"),
    (_raw(prompt_ids=[1]), "exactly one"),
    (json.dumps({"id": "j-1", "tenant": "a"}).encode(), "exactly one"),
    (_raw(max_new_tokens=0), "max_new_tokens"),
    (_raw(max_new_tokens="5"), "max_new_tokens"),  # strict: no coercion
    (_raw(top_p=0.0), "top_p"),
    (_raw(temperature=-1), "temperature"),
    (_raw(max_tokens=5), "max_tokens"),  # unknown fields are refused
    (_raw(id=""), "id"),
    (_raw(id="x" * 257), "id"),
    (_raw(adapter="a@b@c"), "adapter"),
    (_raw(prompt_ids=[-1], prompt=None), "prompt_ids"),
])
def test_invalid_jobs_raise_invalid_job(body, fragment):
    with pytest.raises(JobError) as err:
        decode_job(body)
    assert err.value.code == "invalid_job"
    assert fragment.lower() in err.value.message.lower()


def test_readable_id_survives_validation_errors():
    with pytest.raises(JobError) as err:
        decode_job(_raw(max_new_tokens=-3))
    assert err.value.job_id == "j-1"
    with pytest.raises(JobError) as err:
        decode_job(b'{"tenant": "acme"}')
    assert err.value.job_id is None


def test_headers_fill_missing_fields_only():
    body = json.dumps({"id": "j", "prompt": "hi", "task": "mine"}).encode()
    job = decode_job(body, [("x-tenant-id", b"acme"), ("x-adapter-id", b"fin@v1"), ("x-model-task", b"theirs")])
    assert (job.tenant, job.adapter, job.task) == ("acme", "fin@v1", "mine")
    with pytest.raises(JobError, match="tenant"):
        decode_job(json.dumps({"id": "j", "prompt": "hi"}).encode())


def test_result_round_trip_and_error_codes():
    result = error_result("j", "forbidden", "no", "w-1", adapter="fin", adapter_version="v1")
    back = decode_result(encode(result))
    assert back == result and back.error.code == "forbidden"
    assert set(msgspec.json.decode(encode(JobResult(id="j", status="ok")))) >= {
        "id", "status", "adapter", "adapter_version", "text", "token_ids", "finish_reason", "usage", "error", "worker"}
    assert "internal" in ERROR_CODES and len(ERROR_CODES) == 7
    with pytest.raises(msgspec.ValidationError):
        decode_result(b'{"id": "j", "status": "ok", "error": {"code": "oops", "message": ""}}')


def test_control_events():
    publish = decode_control(b'{"type": "adapter.publish", "name": "fin", "version": "v2", "path": "/a"}')
    assert isinstance(publish, AdapterPublish) and publish.tenants is None
    assert isinstance(decode_control(b'{"type": "adapter.activate", "name": "fin", "version": "v2"}'), AdapterActivate)
    for bad in (b'{"type": "adapter.delete", "name": "x"}', b'{"type": "adapter.publish", "name": "a@b", "version": "v", "path": "/"}',
                b'{"type": "adapter.publish", "name": "a", "version": "v", "path": "/", "sha256": "xyz"}'):
        with pytest.raises(msgspec.ValidationError):
            decode_control(bad)
    assert decode_control(encode(publish)) == publish


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("body,fragment", [
    (_raw(seed=2**64), "seed"),  # killed the engine thread in torch's generator
    (_raw(seed=-1), "seed"),
    (_raw(temperature=1e-320), "temperature"),  # made every neighbour's sampling fail
    (_raw(temperature=1e9), "temperature"),
    (_raw(top_p=1e-300), "top_p"),
    (_raw(top_k=2**40), "top_k"),
    (_raw(max_new_tokens=2**64), "max_new_tokens"),
    (_raw(prompt=None, prompt_ids=[2**63]), "prompt_ids"),
    (_raw(deadline_ms=2**63), "deadline_ms"),
    (_raw(deadline_ms=-5), "deadline_ms"),
    (_raw(reply_to="no spaces/allowed"), "reply_to"),
    (_raw(stop=["x"] * 17), "stop"),
    (b'{"id": "j-1", "tenant": "acme", "prompt": "x", "deadline_ms": 1e400}', "deadline_ms"),
    (b'{"id": "j-1", "tenant": "acme", "prompt": "\\ud800"}', "decode"),  # lone surrogate escape
    (b'{"id": "j-1", "tenant": "acme", "prompt": "\xff\xfe"}', "utf-8"),  # raw invalid UTF-8
    (b'{"id": "j-1", "tenant": "acme", "prompt_ids": ' + DEEP + b"}", "prompt_ids"),
])
def test_hostile_values_are_invalid_jobs_with_their_id(body, fragment):
    with pytest.raises(JobError) as err:
        decode_job(body)
    assert err.value.code == "invalid_job"
    assert err.value.job_id == "j-1", err.value.message
    assert fragment.lower() in err.value.message.lower()
    assert len(err.value.message) <= 1024


@pytest.mark.parametrize("body,job_id", [
    (b'{"x": ' + DEEP + b', "id": "after-deep"}', "after-deep"),
    (b'{"x": "' + b"\\\\" * 1000 + b'\\"", "id": "esc\\"aped"}', 'esc"aped'),
    (b'{"name": "id", "id": "value-not-key"}', "value-not-key"),
    (b'{"\\u0069d": "escaped-key", "tenant": 5}', "escaped-key"),
    (b'{"x": {"id": "nested"}, "y": [{"id": "nested"}]}', None),
    (b'["id", "x"]', None),
    (b'{"id": 5}', None),
    (b'{"id": "\\ud800"}', None),
    (b'{"id": "' + b"x" * 300 + b'"}', None),
    (b'{"id": "cut', None),
])
def test_readable_id_reads_only_a_top_level_string(body, job_id):
    with pytest.raises(JobError) as err:
        decode_job(body)
    assert err.value.job_id == job_id


def test_non_utf8_header_key_is_an_invalid_job():
    # The Kafka reader hands a non-UTF-8 header key over with surrogate escapes (worker/aiokafka_compat.py).
    with pytest.raises(JobError, match="header key") as err:
        decode_job(_raw(), [(b"x-\xff".decode("utf-8", "surrogateescape"), b"v")])
    assert err.value.job_id == "j-1"


# ---- generation controls (docs/generation.md) --------------------------------------------------------

def test_generation_controls_decode_with_their_defaults_and_types():
    from lorabus.schemas import ChoiceFormat, JsonSchemaFormat, RegexFormat

    plain = decode_job(_raw())
    assert (plain.min_p, plain.repetition_penalty, plain.presence_penalty, plain.frequency_penalty, plain.logit_bias,
            plain.min_new_tokens, plain.ignore_eos, plain.stop_token_ids, plain.logprobs, plain.prompt_logprobs,
            plain.response_format, plain.n, plain.stream) == (0.0, 1.0, 0.0, 0.0, None, 0, False, [], None, None,
                                                               None, 1, False)
    job = decode_job(_raw(logit_bias={"42": -100, "7": 2.5}, stop_token_ids=[3], logprobs=20, n=16,
                          response_format={"type": "json_schema", "schema": {"type": "array"}}))
    assert job.logit_bias == {42: -100.0, 7: 2.5}  # JSON object keys are text: they decode as token ids
    assert job.response_format == JsonSchemaFormat(schema={"type": "array"})
    assert decode_job(_raw(response_format={"type": "regex", "pattern": "a+"})).response_format == RegexFormat("a+")
    assert decode_job(_raw(response_format={"type": "choice", "choices": ["y", "n"]})).response_format == \
        ChoiceFormat(["y", "n"])


@pytest.mark.parametrize("fields,fragment", [
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=101), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={"-1": 1}), "logit_bias"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias={"5": 101}), "logit_bias"),
    (dict(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias"),
    (dict(min_new_tokens=65), "min_new_tokens"),
    (dict(stop_token_ids=list(range(65))), "stop_token_ids"),
    (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(n=0), "n"),
    (dict(n=17), "n"),
    (dict(stream_every_tokens=0), "stream_every_tokens"),
    (dict(response_format={"type": "grammar"}), "response_format"),
    (dict(response_format={"type": "json_schema"}), "schema"),
    (dict(response_format={"type": "json_schema", "schema": []}), "schema"),
    (dict(response_format={"type": "regex", "pattern": ""}), "pattern"),
    (dict(response_format={"type": "regex", "pattern": "a" * 4097}), "pattern"),
    (dict(response_format={"type": "choice", "choices": []}), "choices"),
    (dict(response_format={"type": "json_object", "extra": 1}), "extra"),
])
def test_generation_controls_out_of_bounds_are_invalid_jobs(fields, fragment):
    with pytest.raises(JobError) as err:
        decode_job(_raw(**fields))
    assert err.value.code == "invalid_job" and err.value.job_id == "j-1"
    assert fragment in err.value.message


def test_a_schema_keeps_its_written_property_order():
    """The grammar writes properties in the schema's order: reordering them is another format (and output)."""
    from lorabus.worker.wire import output_format

    schema = b'{"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}}}'
    job = decode_job(b'{"id": "j", "tenant": "t", "prompt": "x", "response_format": {"type": "json_schema", "schema": '
                     + schema + b'}}')
    fmt = output_format(job.response_format)
    assert fmt.kind == "json_schema" and list(json.loads(fmt.spec)["properties"]) == ["ok", "n"]
    again = decode_job(b'{"id": "k", "tenant": "t", "prompt": "y", "response_format": {"schema": ' + schema
                       + b', "type": "json_schema"}}')
    assert output_format(again.response_format) == fmt  # the same schema is the same (cached) grammar
