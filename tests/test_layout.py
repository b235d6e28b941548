"""The shape of the house (issue 21), checked: the worker talks to the engine through `lorabus.scheduler`'s
public surface only, and no module of the worker grows past what one reader holds in mind."""

import ast
from pathlib import Path

from lorabus.scheduler import Engine

ROOT = Path(__file__).resolve().parents[1]
WORKER = sorted((ROOT / "worker").rglob("*.py"))
MAX_WORKER_LINES = 420
# Modules of the scheduler package that describe files, not the engine: model families (arch) and the
# PEFT adapter format (adapters). The worker's model store and CLI read files in those formats.
FORMAT_MODULES = {"lorabus.scheduler.arch", "lorabus.scheduler.adapters"}
# Engine's parts, which are its internals: the worker goes through Engine's methods and properties
# (and its plain settings: config, device, dtype, tokenizer, limits) instead.
ENGINE_PARTS = {"model", "adapters", "kv", "scheduler", "runner", "loop"}


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def _engine_attributes(tree: ast.AST):
    """(line, attribute) of every `<x>.engine.<attribute>` and `engine.<attribute>`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = node.value
            if (isinstance(owner, ast.Attribute) and owner.attr == "engine") or (
                    isinstance(owner, ast.Name) and owner.id == "engine"):
                yield node.lineno, node.attr


def test_the_worker_imports_no_engine_internals():
    found = [f"{path.relative_to(ROOT)}:{line}: imports {module}"
             for path in WORKER for line, module in _imports(ast.parse(path.read_text()))
             if module.startswith("lorabus.scheduler.") and module not in FORMAT_MODULES]
    assert not found, "the worker reaches into the engine's modules:\n" + "\n".join(found)


def test_the_worker_uses_only_the_engines_public_surface():
    found = [f"{path.relative_to(ROOT)}:{line}: engine.{attribute}"
             for path in WORKER for line, attribute in _engine_attributes(ast.parse(path.read_text()))
             if attribute in ENGINE_PARTS or attribute.startswith("_")]
    assert not found, "the worker uses Engine internals:\n" + "\n".join(found)


def test_the_checks_catch_what_they_look_for():
    tree = ast.parse("from lorabus.scheduler.adapter_manager import mix_spec\nx = self.engine.adapters.spec(k)\n")
    assert [m for _, m in _imports(tree)] == ["lorabus.scheduler.adapter_manager"]
    assert [a for _, a in _engine_attributes(tree)] == ["adapters"]
    assert ENGINE_PARTS.isdisjoint(dir(Engine)), "a part of the engine shares a name with its public surface"


def test_no_worker_module_is_longer_than_one_reader_holds():
    long = {str(path.relative_to(ROOT)): n for path in WORKER if (n := len(path.read_text().splitlines())) > MAX_WORKER_LINES}
    assert not long, f"worker modules over {MAX_WORKER_LINES} lines: {long}"
