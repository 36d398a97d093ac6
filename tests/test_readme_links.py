"""The READMEs' links land: a ``#anchor`` names a heading of its file (as GitHub spells anchors), and a relative
path names a file of the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READMES = (REPO / "README.md", REPO / "docker" / "README.md")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_anchor_spells_headings_as_github_does() -> None:
    assert (
        anchor("RL: GRPO, GRPO + Sibling, V-STAR (about 900 steps)") == "rl-grpo-grpo--sibling-v-star-about-900-steps"
    )
    assert anchor("Constrained beam search vs HF `generate`") == "constrained-beam-search-vs-hf-generate"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_lands(readme: Path) -> None:
    text = readme.read_text()
    headings = {anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert readme.name != "README.md" or readme.parent != REPO or "#serving-recommendations" in links  # contents
    broken = [
        link
        for link in links
        if not link.startswith(("http://", "https://"))
        and (link[1:] not in headings if link.startswith("#") else not (readme.parent / link).exists())
    ]
    assert not broken, f"{readme.name}: links that land nowhere: {broken}"
