"""Run every benchmark (or the ones named): ``python -m bench [name …]``.

Each prints ratios measured in one run (method vs SFT, batched vs sequential), never pass/fail.
"""
from __future__ import annotations

import importlib
import sys

ALL = ("organism_cost", "generation", "alignment_defenses", "finetune_defenses", "data_defenses",
       "repair_defenses")


def main(names: list[str]) -> None:
    for name in names or ALL:
        print(f"\n===== bench.{name} =====", flush=True)
        importlib.import_module(f"bench.{name}").main([])


if __name__ == "__main__":
    main(sys.argv[1:])
