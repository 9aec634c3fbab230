"""The documentation: a short README with the commands CI runs, every driver flag in docs/flags.md, links that
resolve."""

import re
import unicodedata
from pathlib import Path

import pytest

from inference_sim import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FLAGS = DOCS / "flags.md"
INSTALL = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test,efficientnet,onnx]"'
TEST_COMMAND = "python -m pytest -q"
MAX_README_LINES = 200


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def option_strings() -> list[str]:
    """Every option string of the driver's parser but -h/--help, in the parser's order."""
    return [opt for action in build_parser()._actions for opt in action.option_strings
            if opt not in ("-h", "--help")]


def mentions_flag(text: str, flag: str) -> bool:
    """``flag`` occurs as a whole token: not inside a longer flag (``-b`` in ``-bca``, ``-ep`` in ``-ep_a``,
    ``--cal`` in ``--cal-data``) nor as the tail of one (``-cache`` in ``--no-cache``)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_flag_matching_is_by_whole_token():
    assert mentions_flag("`-b/--batch-size`", "-b")
    assert mentions_flag("| `-pz/--preserve_zero` |", "--preserve_zero")
    assert mentions_flag("`--cache/--no-cache`", "--cache")
    assert mentions_flag("`-cs N`", "-cs")
    assert not mentions_flag("`-bca`, `-bcw`", "-b")
    assert not mentions_flag("`-ep_a intN`", "-ep")
    assert not mentions_flag("`--no-cache`", "-cache")
    assert not mentions_flag("`--cal-data DIR`", "--cal")
    assert not mentions_flag("`--stochastic`", "-s")


def test_every_driver_flag_is_in_the_flag_reference():
    flags = option_strings()
    assert len(flags) > 50  # the parser was read, not an empty list
    text = FLAGS.read_text(encoding="utf-8")
    undocumented = [flag for flag in flags if not mentions_flag(text, flag)]
    assert not undocumented, f"{FLAGS.relative_to(ROOT)} lacks these inference_sim.py flags: {' '.join(undocumented)}"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_has_the_commands_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert INSTALL in text
    assert TEST_COMMAND in text


def test_readme_lists_every_docs_page():
    linked = {target for target, _ in links(README)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if f"docs/{p.name}" not in linked]
    assert not missing, f"README.md links no docs page named {missing}"


FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text with fenced code blocks removed and each inline code span reduced to a word, so that brackets in
    code are not links while a link whose text is code still is."""
    return INLINE_CODE.sub("code", FENCE.sub("", text))


def links(path: Path) -> list[tuple[str, str]]:
    """(path part, anchor) of every relative link and image of a markdown file; anchors of links within the file
    have an empty path part."""
    found = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        found.append((file_part, anchor))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def test_slug_follows_github():
    assert slug("Comparing clipping methods: `--compare`") == "comparing-clipping-methods---compare"
    assert slug("4-bit: what each method buys") == "4-bit-what-each-method-buys"
    assert slug("Compiled inference (`--compile`)") == "compiled-inference---compile"
    assert slug("The grid actually used: `-th laplace-grid`, `-th gaus-grid`") == \
        "the-grid-actually-used--th-laplace-grid--th-gaus-grid"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert path.is_file()
    broken = []
    for file_part, anchor in links(path):
        target = (path.parent / file_part).resolve() if file_part else path
        if not target.exists():
            broken.append(f"{file_part} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{file_part}#{anchor} (no such heading)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_link_finder_sees_links_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [a](a.md#x), ![fig](../figures/f.png) and [`code`](b.md); "
                    "[web](https://example.org) `[-hr](not-a-link-either)`\n\n"
                    "```bash\npython x.py [-hr](not-a-link)\n```\n", encoding="utf-8")
    assert links(page) == [("a.md", "x"), ("../figures/f.png", ""), ("b.md", "")]
