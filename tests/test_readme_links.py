"""The READMEs' and docs' links land: a ``#anchor`` names a heading of its file (as GitHub spells anchors), a
relative path names a file of the repository, and ``path#anchor`` a heading of that file."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READMES = (REPO / "README.md", REPO / "docker" / "README.md", *sorted((REPO / "docs").glob("*.md")))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_anchor_spells_headings_as_github_does() -> None:
    assert (
        anchor("RL: GRPO, GRPO + Sibling, V-STAR (about 900 steps)") == "rl-grpo-grpo--sibling-v-star-about-900-steps"
    )
    assert anchor("Constrained beam search vs HF `generate`") == "constrained-beam-search-vs-hf-generate"


@functools.cache
def headings(path: Path) -> frozenset[str]:
    """The anchors of a Markdown file's headings (read once per file: many links name the same file)."""
    return frozenset(anchor(m) for m in re.findall(r"^#{1,6} (.+)$", path.read_text(), flags=re.M))


def lands(readme: Path, link: str) -> bool:
    """Whether a link of ``readme`` lands: on a heading of its own file, a file, or a heading of that file."""
    if link.startswith(("http://", "https://")):
        return True
    path, _, name = link.partition("#")
    target = readme.parent / path if path else readme
    if not name:
        return target.exists()
    return target.is_file() and name in headings(target)


def test_a_link_into_another_file_must_name_one_of_its_headings(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n\n## Part two\n")
    readme = tmp_path / "README.md"
    assert lands(readme, "a.md") and lands(readme, "a.md#part-two")
    assert not lands(readme, "a.md#part-three") and not lands(readme, "b.md#a") and not lands(readme, "b.md")


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_lands(readme: Path) -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", readme.read_text())
    assert readme.name != "README.md" or readme.parent != REPO or "#serving-recommendations" in links  # contents
    broken = [link for link in links if not lands(readme, link)]
    assert not broken, f"{readme.name}: links that land nowhere: {broken}"
