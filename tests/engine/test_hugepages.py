"""Big host buffers (the decode weights' panels, the KV cache) land on 2 MiB pages."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import hugepages

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_kib_around(addr: int) -> int:
    """AnonHugePages of the mapping that holds addr, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_small_buffers_are_plain_and_big_ones_aligned() -> None:
    small = hugepages.empty(1000)
    assert small.shape == (1000,) and small.dtype is torch.float32
    big = hugepages.empty(3 << 20, torch.float32)  # 12 MiB
    assert big.shape == (3 << 20,) and big.data_ptr() % hugepages.HUGE_PAGE == 0
    big.fill_(2.0)
    assert float(big.sum()) == 2.0 * (3 << 20)


@pytest.mark.skipif(not _THP.exists() or "[never]" in _THP.read_text(), reason="no transparent huge pages here")
def test_big_buffers_are_backed_by_huge_pages() -> None:
    big = hugepages.empty(4 << 20)  # 16 MiB, touched below for the first time
    big.zero_()
    assert _huge_kib_around(big.data_ptr()) >= 8 << 10  # at least half of it on 2 MiB pages
