"""The documentation keeps up with the code: the README's map names every module."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_maintainers_map_names_every_module():
    section = (ROOT / "README.md").read_text().split("## For maintainers: the map", 1)[1].split("\n## ")[0]
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", section))
    package = ROOT / "ingest"
    modules = {p.name for p in package.glob("*.py")} | {
        f"{p.name}/" for p in package.iterdir() if p.is_dir() and not p.name.startswith("__")
    }
    assert modules - named == set(), "add these to the README's map"
    for sub in (p for p in package.iterdir() if (p / "__init__.py").exists()):
        inner = {f"{q.name}" for q in sub.glob("*.py") if q.name != "__init__.py"}
        assert inner <= named, f"name the modules of {sub.name}/ in the README's map: {sorted(inner - named)}"
