"""Adapter paths confined to `--adapter-root` (worker/adapter_paths.py): escapes by `..`, by a symlinked
directory and by a symlinked weights file are refused; file:// URIs, several roots and no roots work."""

from pathlib import Path

import pytest

from lorabus.worker.adapter_paths import AdapterPathError, confine_adapter_path

FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in FILES:
        (path / name).write_text("{}")
    return path


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "root"
    outside = adapter_dir(tmp_path / "outside" / "evil")
    good = adapter_dir(root / "team" / "fin-v1")
    return root, outside, good


def test_inside_root_is_allowed_and_resolved(layout):
    root, _, good = layout
    assert confine_adapter_path(str(good), [str(root)]) == str(good.resolve())
    # `..` that stays inside the root is fine: the resolved path is what counts, and what is returned.
    assert confine_adapter_path(f"{root}/team/../team/fin-v1", [str(root)]) == str(good.resolve())
    assert confine_adapter_path(f"{good}/", [str(root)]) == str(good.resolve())


def test_dotdot_escape_is_refused(layout):
    root, outside, _ = layout
    with pytest.raises(AdapterPathError, match="outside the adapter roots"):
        confine_adapter_path(f"{root}/../outside/evil", [str(root)])
    with pytest.raises(AdapterPathError, match="outside the adapter roots"):
        confine_adapter_path(str(outside), [str(root)])
    # A sibling sharing the root's name as a prefix is not under it.
    sibling = adapter_dir(root.parent / (root.name + "-evil"))
    with pytest.raises(AdapterPathError, match="outside"):
        confine_adapter_path(str(sibling), [str(root)])


def test_symlinked_directory_escaping_is_refused(layout):
    root, outside, _ = layout
    link = root / "team" / "link"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterPathError, match="through a symlink") as info:
        confine_adapter_path(str(link), [str(root)])
    assert str(outside.resolve()) in str(info.value)
    # A symlinked parent directory counts too.
    (root / "parent-link").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(AdapterPathError, match="outside"):
        confine_adapter_path(str(root / "parent-link" / "evil"), [str(root)])


@pytest.mark.parametrize("name", FILES)
def test_symlinked_adapter_file_escaping_is_refused(layout, name):
    root, outside, _ = layout
    sneaky = root / "sneaky"
    sneaky.mkdir()
    for other in FILES:
        if other != name:
            (sneaky / other).write_text("{}")
    (sneaky / name).symlink_to(outside / name)
    with pytest.raises(AdapterPathError, match=f"{name} resolves to .*outside"):
        confine_adapter_path(str(sneaky), [str(root)])
    # A dangling link pointing out of the roots is refused as well (it could be created later).
    (sneaky / name).unlink()
    (sneaky / name).symlink_to(outside / "not-yet")
    with pytest.raises(AdapterPathError, match=name):
        confine_adapter_path(str(sneaky), [str(root)])


def test_symlinks_inside_the_root_are_fine(layout):
    root, _, good = layout
    (root / "alias").symlink_to(good, target_is_directory=True)
    assert confine_adapter_path(str(root / "alias"), [str(root)]) == str(good.resolve())
    shared = root / "shared-weights.safetensors"
    shared.write_text("{}")
    linked = root / "linked"
    linked.mkdir()
    (linked / "adapter_config.json").write_text("{}")
    (linked / "adapter_model.safetensors").symlink_to(shared)
    assert confine_adapter_path(str(linked), [str(root)]) == str(linked.resolve())


def test_root_given_through_a_symlink(tmp_path, layout):
    root, _, good = layout
    alias = tmp_path / "root-alias"
    alias.symlink_to(root, target_is_directory=True)
    assert confine_adapter_path(str(good), [str(alias)]) == str(good.resolve())
    assert confine_adapter_path(str(alias / "team" / "fin-v1"), [str(root)]) == str(good.resolve())


def test_file_uris(layout):
    root, outside, good = layout
    assert confine_adapter_path(f"file://{good}", [str(root)]) == str(good.resolve())
    assert confine_adapter_path(f"file://localhost{good}", [str(root)]) == str(good.resolve())
    with pytest.raises(AdapterPathError, match="outside"):
        confine_adapter_path(f"file://{outside}", [str(root)])
    # Percent-encoding is decoded before resolving: %2e%2e is `..`.
    with pytest.raises(AdapterPathError, match="outside"):
        confine_adapter_path(f"file://{root}/%2e%2e/outside/evil", [str(root)])
    with pytest.raises(AdapterPathError, match="host 'evil.example'"):
        confine_adapter_path(f"file://evil.example{good}", [str(root)])
    with pytest.raises(AdapterPathError, match="only local directories"):
        confine_adapter_path("s3://bucket/fin-v1", [str(root)])


def test_relative_and_nul_paths_are_refused(layout, monkeypatch):
    root, _, good = layout
    monkeypatch.chdir(root)  # even when the worker's cwd makes it resolve inside
    with pytest.raises(AdapterPathError, match="not absolute"):
        confine_adapter_path("team/fin-v1", [str(root)])
    with pytest.raises(AdapterPathError, match="NUL"):
        confine_adapter_path(f"{good}\x00/x", [str(root)])


def test_multiple_roots(tmp_path, layout):
    root, outside, good = layout
    other_root = tmp_path / "other"
    second = adapter_dir(other_root / "sum-v1")
    roots = [str(root), str(other_root)]
    assert confine_adapter_path(str(good), roots) == str(good.resolve())
    assert confine_adapter_path(str(second), roots) == str(second.resolve())
    with pytest.raises(AdapterPathError, match="outside"):
        confine_adapter_path(str(outside), roots)
    # A link from one root into another is fine: both are trusted.
    (root / "to-other").symlink_to(second, target_is_directory=True)
    assert confine_adapter_path(str(root / "to-other"), roots) == str(second.resolve())


def test_empty_roots_allow_any_local_path(layout):
    _, outside, _ = layout
    for path in (str(outside), "relative/dir", f"{outside}/../x"):
        assert confine_adapter_path(path, []) == path
    # A file:// URI is decoded the same way with or without roots, so the loader reads what was checked.
    assert confine_adapter_path(f"file://{outside}/a%20b", []) == f"{outside}/a b"
    with pytest.raises(AdapterPathError, match="host"):
        confine_adapter_path("file://elsewhere/x", [])


def test_empty_string_root_fails_closed(layout):
    _, outside, _ = layout
    with pytest.raises(AdapterPathError, match="empty"):
        confine_adapter_path(str(outside), [""])


def test_error_is_a_value_error(layout):
    root, outside, _ = layout
    with pytest.raises(ValueError):
        confine_adapter_path(str(outside), [str(root)])
    assert issubclass(AdapterPathError, ValueError)
