"""docs/math.md is the project's math page: it covers every public op and every method with its defaults, every
link to it resolves to a section, and no user-facing text points to a SPEC.md the repository does not ship."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import modfuse
from modfuse import methods, ops

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"
OPS = ops.OPS  # the one list of op names (modfuse/ops.py): a new op needs its section here


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _sections() -> dict[str, str]:
    """Anchor -> text of that section (up to the next heading of any level)."""
    out, anchor, lines = {}, None, []
    for line in MATH.read_text().splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            if anchor is not None:
                out[anchor] = "\n".join(lines)
            anchor, lines = _slug(m.group(1)), []
        else:
            lines.append(line)
    out[anchor] = "\n".join(lines)
    return out


def _documented_defaults(text: str) -> dict[str, object]:
    """`name=value` pairs written in a section, values parsed as Python literals; the last one wins (a section
    ends with its options and defaults, after formulas such as "with continuous=True")."""
    found = {}
    for name, value in re.findall(r"\b([a-z_][a-z_0-9]*)=([^,)\s`]+)", text):
        try:
            found[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            continue
    return found


def _defaults(fn, skip=("self", "balancer", "backend", "check_finite")) -> dict[str, object]:
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.default is not inspect.Parameter.empty and p.name not in skip
    }


def test_every_public_op_is_in_an_op_section():
    assert set(OPS) <= set(modfuse.__all__)
    op_headings = [a for a in _sections() if a.startswith("op-")]
    for name in OPS:
        assert any(re.search(rf"(^|-){re.escape(name)}($|-)", a) for a in op_headings), f"no Op section for {name}"


@pytest.mark.parametrize("name", OPS)
def test_op_defaults_match_the_code(name):
    section = next(
        text for a, text in _sections().items() if a.startswith("op-") and re.search(rf"(^|-){re.escape(name)}($|-)", a)
    )
    documented = _documented_defaults(section)
    for option, default in _defaults(getattr(ops, name)).items():
        assert option in documented, f"docs/math.md does not give {name}'s default {option}={default!r}"
        assert documented[option] == default, (
            f"{name}: docs/math.md says {option}={documented[option]!r}, the code {default!r}"
        )


@pytest.mark.parametrize("name", methods.names())
def test_every_method_has_a_section_with_its_options_and_defaults(name):
    sections = _sections()
    assert name in sections, f"docs/math.md has no '### {name}' section"
    documented = _documented_defaults(sections[name])
    for option, default in _defaults(methods.get(name).__init__).items():
        assert option in documented, f"docs/math.md '{name}' does not give the option {option}={default!r}"
        assert documented[option] == default, (
            f"{name}: docs/math.md says {option}={documented[option]!r}, the code {default!r}"
        )


def test_metrics_section_names_both_utilization_rates():
    text = _sections()["metrics"]
    assert "Conditional utilization rate" in text and "Shuffle utilization" in text


def _linking_files():
    yield ROOT / "README.md"
    yield MATH
    for folder in ("modfuse", "tests", "examples", "bench"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_every_link_to_math_md_resolves():
    anchors = set(_sections())
    links = 0
    for path in _linking_files():
        text = path.read_text()
        targets = re.findall(r"docs/math\.md#([\w\-]+)", text)
        if path == MATH:
            targets += re.findall(r"\]\(#([\w\-]+)\)", text)
        for anchor in targets:
            links += 1
            assert anchor in anchors, f"{path.relative_to(ROOT)} links docs/math.md#{anchor}, which is no section"
    assert links > 10


def test_no_user_facing_text_points_to_spec_md():
    """SPEC.md is not in the repository: the README and the package's docstrings point to docs/math.md."""
    assert not (ROOT / "SPEC.md").exists()
    for path in [ROOT / "README.md", *sorted((ROOT / "modfuse").rglob("*.py"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(r"\bSPEC\b", line), f"{path.relative_to(ROOT)}:{number} points to SPEC: {line.strip()}"
