"""Every relative link in README.md, docs/*.md and deploy/**/*.md resolves: the file (or folder) exists
in the repository, and a `#anchor` names a heading of its target, slugged as GitHub does. The README is
a front door: it links every docs/ page and the wire contract, and says where the contract is versioned.
"""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/*.md", "deploy/**/*.md"]

FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); link text may hold one level of brackets; an optional "title".
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def documents() -> list[Path]:
    found = {path for pattern in DOCUMENTS for path in ROOT.glob(pattern)}
    return sorted(path for path in found if ".venv" not in path.parts)


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)[0] * 3
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lowercased, every character other than a letter,
    mark, decimal digit, `_`, `-` or space dropped, spaces turned into hyphens (github-slugger)."""
    text = CODE_SPAN.sub(lambda m: m.group(2).strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link or image: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    kept = [c for c in text.lower()
            if c in "- " or unicodedata.category(c)[0] in "LM" or unicodedata.category(c) in ("Nd", "Pc")]
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a page offers: its headings' slugs (a repeated slug gets -1, -2, ...) and HTML anchors."""
    found, seen = set(), {}
    for _, line in prose_lines(path.read_text()):
        found.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link of a page, code blocks and code spans left out."""
    found = []
    for number, line in prose_lines(path.read_text()):
        line = CODE_SPAN.sub(lambda m: "code", line)
        targets = INLINE_LINK.findall(line) + HTML_LINK.findall(line)
        reference = REFERENCE_DEF.match(line)
        if reference:
            targets.append(reference.group(1))
        found += [(number, target) for target in targets]
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with each relative link of `path`, one line each; [] when every one resolves."""
    problems = []
    for number, target in links(path):
        if not target or SCHEME.match(target):
            continue  # an empty target is no link; web addresses are not checked here
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(root)}:{number}: {target}"
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(root):
            problems.append(f"{where}: points outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.relative_to(root)}")
    return problems


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_pages_are_found():
    names = {str(path.relative_to(ROOT)) for path in documents()}
    assert {"README.md", "docs/wire-contract.md", "deploy/demo-adapters/README.md"} <= names


def test_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for _, target in links(ROOT / "README.md")
              if not SCHEME.match(target)}
    orphans = [str(page.relative_to(ROOT)) for page in sorted((ROOT / "docs").glob("*.md")) if page not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_readme_points_at_the_wire_contract_and_where_it_is_versioned():
    readme = (ROOT / "README.md").read_text()
    targets = [target for _, target in links(ROOT / "README.md")]
    assert any(target.partition("#")[0] == "docs/wire-contract.md" for target in targets)
    assert "`schemas/`" in readme


@pytest.mark.parametrize("heading, expected", [
    ("Wire contract v1", "wire-contract-v1"),
    ("Job (jobs topic)", "job-jobs-topic"),
    ("Result (reply topic, record key = job id)", "result-reply-topic-record-key--job-id"),
    ("Exactly-once (`--exactly-once`)", "exactly-once---exactly-once"),
    ("Re-measured 2026-11-29 (afternoon, current): CPU LoRA plans for steps without a grid",
     "re-measured-2026-11-29-afternoon-current-cpu-lora-plans-for-steps-without-a-grid"),
    ("A [linked](x.md) `code_name` — done", "a-linked-code_name--done"),
    ("Déjà vu ×2", "déjà-vu-2"),
])
def test_slugs_are_githubs(heading, expected):
    assert slug(heading) == expected


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Some section\n\n## Some section\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md) [ok](docs/page.md#some-section) [ok](docs/page.md#some-section-1) [ok](#readme)\n"
        "[web](https://example.com/missing) `[in code](missing.md)`\n"
        "```\n[in a block](missing.md)\n```\n"
        "# Readme\n"
        "[gone](docs/gone.md) [bad anchor](docs/page.md#other) ![img](docs/pic.svg)\n"
        "[outside](../elsewhere.md)\n[ref]: docs/missing-ref.md\n")
    problems = broken_links(tmp_path / "README.md", root=tmp_path)
    assert [p.split(": ", 1)[0] for p in problems] == ["README.md:7", "README.md:7", "README.md:7",
                                                        "README.md:8", "README.md:9"], problems
    assert "docs/gone.md: no such file" in problems[0]
    assert "#other" in problems[1] and "docs/pic.svg" in problems[2]
    assert "outside the repository" in problems[3] and "missing-ref.md" in problems[4]
