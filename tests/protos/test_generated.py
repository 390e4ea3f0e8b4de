"""The wire contract: the committed generated modules match the .proto, and every field and enum value is commented."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "protos/pdserve/v1/pdserve.proto"
# A field (`optional uint32 max_tokens = 5;`, `map<string, int32> x = 1;`, a oneof member) or an enum value
# (`FINISH_REASON_STOP = 1;`): a name assigned a number. Options (`option x = "y";`) assign no number.
NUMBERED = re.compile(r"^\s*(?:(?:optional|repeated)\s+)?(?:(?:map<[^>]*>|[\w.]+)\s+)?\w+\s*=\s*\d+\s*(?:\[.*\])?\s*;")


def uncommented(proto_text: str) -> list[str]:
    """The numbered lines (fields, enum values) whose line above is not a `//` comment."""
    lines = proto_text.splitlines()
    return [line.strip() for above, line in zip([""] + lines, lines)
            if NUMBERED.match(line) and not above.strip().startswith("//")]


def test_regenerating_changes_nothing() -> None:
    result = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], check=False, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_field_and_enum_value_has_a_comment_above_it() -> None:
    text = PROTO.read_text()
    assert sum(bool(NUMBERED.match(line)) for line in text.splitlines()) > 50  # the parser sees the fields
    assert uncommented(text) == [], "give each of these a `//` comment line right above it in pdserve.proto"


def test_the_check_catches_an_uncommented_field() -> None:
    snippet = """
message M {
  // Commented.
  optional float a = 1;
  repeated string b = 2;
  oneof c {
    // Commented.
    string d = 3;
    TokenIds e = 4;
  }
  map<string, int32> f = 5 [deprecated = true];
  option (x) = "y";
}
enum E {
  // Commented.
  E_UNSPECIFIED = 0;
  E_ONE = 1;
}
"""
    assert uncommented(snippet) == ["repeated string b = 2;", "TokenIds e = 4;",
                                    "map<string, int32> f = 5 [deprecated = true];", "E_ONE = 1;"]
