"""StopStrings fed text piece by piece finds the same stop as a search of the whole text, and
never lets out text that could still turn into a stop string."""
from __future__ import annotations

import random

from detok import StopStrings


def scan(stops: list[str], pieces: list[str]) -> tuple[str, str]:
    """Feed pieces as the router does; returns (text up to the stop, the text released meanwhile)."""
    stop, text, released = StopStrings(stops), "", ""
    for piece in pieces:
        new_from = len(text)
        text += piece
        if (cut := stop.find(text, new_from)) is not None:
            return text[:cut], released
        released = text[:stop.safe_end(text)]
    return text, released


def test_piecewise_search_equals_whole_text_search() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab,.") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab,.") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        hits = [i for s in stops if (i := text.find(s)) >= 0]
        expected = text[:min(hits)] if hits else text
        got, released = scan(stops, pieces)
        assert got == expected, (text, stops, pieces)
        assert expected.startswith(released)  # nothing released was cut later


def test_safe_end_holds_back_a_possible_start() -> None:
    stop = StopStrings(["END of"])
    assert stop.safe_end("The answer EN") == len("The answer EN") - 5
    assert StopStrings([]).safe_end("abc") == 3 and StopStrings([""]).find("abc") is None
