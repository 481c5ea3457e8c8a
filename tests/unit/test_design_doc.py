"""docs/design.md names the test that proves each invariant; a renamed test must not leave it
pointing at nothing, and every invariant number the code cites must be one the document holds."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DESIGN = (ROOT / "docs" / "design.md").read_text()


def test_every_test_the_design_cites_exists() -> None:
    missing = []
    for path, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", DESIGN):
        source = ROOT / path
        if not source.exists() or not re.search(rf"def {name}\b", source.read_text()):
            missing.append(f"{path}::{name}")
    for path in re.findall(r"`(tests/[\w/]+\.py)`", DESIGN):
        if not (ROOT / path).exists():
            missing.append(path)
    assert not missing, missing


def test_every_invariant_the_code_cites_is_in_the_design() -> None:
    numbers = {int(n) for n in re.findall(r"^\s*(\d+)\. \*\*", DESIGN, re.MULTILINE)}
    assert set(range(1, 22)) <= numbers
    cited: dict[int, list[str]] = {}
    for path in [*ROOT.glob("bff/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        for n in re.findall(r"[Ii]nvariants? (\d+)", path.read_text()):
            cited.setdefault(int(n), []).append(str(path.relative_to(ROOT)))
    unknown = {n: where for n, where in cited.items() if n not in numbers}
    assert not unknown, unknown
