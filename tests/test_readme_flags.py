"""The README's flag tables against the command line itself (`run.build_parser`, generated from
RunConfig): every flag documented, no flag documented that does not exist, and every default the
tables state in the closing "(`value`)" equal to RunConfig's."""

import re
from pathlib import Path

from cwa_dist.config import RunConfig
from cwa_dist.run import build_parser
from cwa_dist.settings import leaves

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| ((?:`--[a-z0-9-]+`(?:, )?)+) \| (.*) \|$")


def _rows() -> dict[tuple[str, ...], str]:
    rows = {}
    for line in README.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows[tuple(re.findall(r"`(--[a-z0-9-]+)`", m.group(1)))] = m.group(2)
    return rows


def _parser_flags() -> dict[str, str]:
    """flag → flat setting name."""
    return {opt: a.dest for a in build_parser()._actions for opt in a.option_strings
            if opt.startswith("--") and opt != "--help"}


def test_every_flag_is_documented_once_and_no_other():
    documented = [f for flags in _rows() for f in flags]
    assert len(documented) == len(set(documented)), "a flag is documented twice"
    flags = _parser_flags()
    assert sorted(set(flags) - set(documented)) == [], "flags missing from the README's tables"
    assert sorted(set(documented) - set(flags)) == [], "the README documents flags the CLI does not have"


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(_shown(v) for v in value)
    return str(value)


def test_the_stated_defaults_are_the_configs():
    defaults = {leaf.flat: leaf.default for leaf in leaves(RunConfig)}
    flags = _parser_flags()
    checked = 0
    for names, text in _rows().items():
        stated = re.search(r"\(`([^`]+)`\)$", text)
        if len(names) != 1 or not stated or flags[names[0]] not in defaults:
            continue
        default = defaults[flags[names[0]]]
        if default is None:
            continue  # worked out at run time (the text says how)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert float(stated.group(1)) == default, (names[0], stated.group(1), default)
        else:
            assert stated.group(1) == _shown(default), (names[0], stated.group(1), default)
        checked += 1
    assert checked >= 15  # the check ran over the tables, not over nothing
