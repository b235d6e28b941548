"""`lorabus demo` (what `make demo` runs) through the real broker on SmolLM2 with the committed demo adapters,
and the adapters themselves (deploy/demo-adapters)."""

import asyncio
import json
import os
import re
import sys

from lorabus.schemas import decode_job
from lorabus.worker import demo

LABELS = ("base model", *(f"{name}@{demo.VERSION}" for name in demo.ADAPTERS))
FREE_LABEL = f"{demo.STRUCTURED}@{demo.VERSION} {demo.FREE}"  # shown only where the free answer is not valid JSON
FRENCH = {"le", "la", "les", "est", "de", "des", "du", "une", "un", "et", "en", "je", "vous", "il", "elle", "sont",
          "avec", "dans", "pour", "c'est", "au", "aux", "très"}
ENGLISH = {"the", "is", "and", "of", "you", "a", "to", "in", "it", "with", "are"}
PIRATE = re.compile(r"\b(arr+|matey|hearty|hearties|ye|yer|aye|ahoy|be)\b", re.IGNORECASE)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())


def test_demo_adapters_are_small_distinct_peft_directories():
    adapters = demo.demo_adapters()
    assert set(adapters) == {"pirate", "french", "entities"}
    shapes = set()
    for name, path in adapters.items():
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and 1 <= config["r"] <= 16, (name, config["r"])
        shapes.add((config["r"], tuple(sorted(config["target_modules"]))))
        assert (path / "adapter_model.safetensors").stat().st_size < 8 * 2**20, name
        training = json.loads((path / "training.json").read_text())
        assert training["recipe"]["rank"] == config["r"] and training["losses"], name
    assert len(shapes) == 3, f"each adapter has its own rank and target modules: {shapes}"


def test_demo_jobs_are_interleaved_chat_jobs():
    jobs = demo.demo_jobs("t")
    assert len(jobs) == len(demo.QUESTIONS) * (2 + len(demo.ADAPTERS))  # the entities adapter twice: schema, free
    decoded = [decode_job(value) for _, value in jobs]
    formats = {(job.adapter, job.id.endswith(f"-{demo.FREE}"), job.response_format is not None) for job in decoded}
    assert formats == {(None, False, False), ("pirate", False, False), ("french", False, False),
                       ("entities", False, True), ("entities", True, False)}, formats
    schema = next(job.response_format for job in decoded if job.response_format is not None)
    assert (schema.schema, type(schema).__name__) == (demo.ENTITIES_FORMAT["schema"], "JsonSchemaFormat")
    assert all(job.messages and job.prompt is None and job.prompt_ids is None for job in decoded)
    adapters = [job.adapter for job in decoded]
    assert all(a != b for a, b in zip(adapters, adapters[1:])), adapters
    assert {job.messages[0].content for job in decoded} == set(demo.QUESTIONS)


def test_demo_table_cuts_answers_to_the_width():
    rows = [("What is it?", "base model", "word " * 100), ("What is it?", "pirate@v1", "Arr!")]
    table = demo.render_table(rows, columns=100)
    assert all(len(line) <= 100 for line in table.splitlines()), table
    assert table.count("What is it?") == 1 and "…" in table and "Arr!" in table


def test_demo_rows_mark_the_schema_and_show_an_invalid_free_answer():
    from lorabus.schemas import JobResult

    jobs = demo.demo_jobs("t", questions=["q1", "q2"])
    texts = {"base": "hi", "pirate": "Arr", "french": "Salut", "entities": '["Paris"]'}
    results = {}
    for job_id, _ in jobs:
        name = job_id.split("-")[3]
        free = job_id.endswith(f"-{demo.FREE}")
        text = ("Paris, France" if "-q0-" in job_id else '["Paris"]') if free else texts[name]
        results[job_id] = [JobResult(id=job_id, status="ok", text=text, adapter=None if name == "base" else name,
                                     adapter_version=None if name == "base" else "v1")]
    rows = demo.table_rows(jobs, results)
    marked = ("q1", "entities@v1", f'["Paris"] ← {demo.VALID}')
    assert rows.index(("q1", FREE_LABEL, "Paris, France")) == rows.index(marked) + 1  # the free answer beside it
    assert not any(served == FREE_LABEL for q, served, _ in rows if q == "q2"), rows  # valid JSON free: not shown
    assert len(rows) == 2 * (1 + len(demo.ADAPTERS)) + 1
    assert demo.free_summary(jobs, results) == "entities without the schema: 1/2 answers valid JSON (the others are shown above)"
    assert demo.is_string_array('["a", "b"]') and not demo.is_string_array('["a", 1]') and not demo.is_string_array("a")


def test_demo_without_its_adapters_says_where_they_are(tmp_path):
    try:
        demo.demo_adapters(tmp_path)
    except demo.DemoError as exc:
        assert "deploy/demo-adapters" in str(exc) and "train.py" in str(exc)
    else:
        raise AssertionError("no DemoError")


def _table(out: str) -> dict[str, dict[str, str]]:
    """question → served-by label → answer, from the table the demo prints."""
    answers: dict[str, dict[str, str]] = {}
    question = None
    for line in out.splitlines():
        for label in (*LABELS, FREE_LABEL):
            marker = f"  {label}  "
            if label != FREE_LABEL and f"  {FREE_LABEL}  " in line:
                continue
            if marker in line:
                head, answer = line.split(marker, 1)
                question = head.strip() or question
                answers.setdefault(question, {})[label] = answer.strip()
    return answers


async def test_demo_shows_adapters_doing_different_things(kafka, smollm2, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lorabus.worker.cli", "demo", "--workdir", str(tmp_path / "demo"), "--metrics-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka, "COLUMNS": "400"})  # answers not cut
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    out, err = out.decode(), err.decode()
    assert proc.returncode == 0, err[-3000:]
    jobs = len(demo.QUESTIONS) * (2 + len(demo.ADAPTERS))
    assert f"{jobs}/{jobs} jobs answered" in out, out
    assert "metrics: http://127.0.0.1:" in out and "lorabus_jobs_completed_total" in out
    table = _table(out)
    assert set(table) == set(demo.QUESTIONS) and all(set(row) - {FREE_LABEL} == set(LABELS) for row in table.values()), out
    # Under the schema every entities answer is an array of strings, and the table says so; a free answer shown
    # beside one is not valid JSON (those that are stay out of the table).
    for question, row in table.items():
        answer, _, mark = row["entities@v1"].rpartition(" ← ")
        assert mark == demo.VALID and demo.is_string_array(answer), (question, row["entities@v1"])
        row["entities@v1"] = answer
        if FREE_LABEL in row:
            assert not demo.is_json(row.pop(FREE_LABEL)), (question, out)
    print(out)

    # the real model: it knows the capital of France
    assert "Paris" in table["What is the capital of France?"]["base model"], out
    for question, row in table.items():  # every adapter changes every answer
        for name in demo.ADAPTERS:
            assert row[f"{name}@v1"] != row["base model"], (question, name, out)
    pirate = [row["pirate@v1"] for row in table.values()]
    assert sum(bool(PIRATE.search(a)) for a in pirate) >= 3 and sum(len(PIRATE.findall(a)) for a in pirate) >= 8, pirate
    french = [_words(row["french@v1"]) for row in table.values()]
    assert sum(len(FRENCH.intersection(w)) >= 2 and len(FRENCH.intersection(w)) > len(ENGLISH.intersection(w))
               for w in french) >= 3, french
    base = [_words(row["base model"]) for row in table.values()]
    assert all(len(FRENCH.intersection(w)) < len(ENGLISH.intersection(w)) for w in base), base
    entities = {q: row["entities@v1"] for q, row in table.items()}
    lists = {}
    for question, answer in entities.items():
        try:
            parsed = json.loads(answer)
        except ValueError:
            continue
        if isinstance(parsed, list) and all(isinstance(e, str) for e in parsed):
            lists[question] = parsed
    assert len(lists) >= 3, entities
    assert {"Barack Obama", "Paris"} <= set(lists.get("Barack Obama visited Paris in 2015.", [])), entities
