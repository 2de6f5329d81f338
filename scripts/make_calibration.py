#!/usr/bin/env python
"""Write the demo's calibration pools, the text the teachers are cached on:

    .venv/bin/python scripts/make_calibration.py     # recipes/data/{math,boolq}_calibration.jsonl

Each line is {"prompt": ..., "response": ...}, the same held-out-safe pairs the experts were
trained on (scripts/build_experts.py: MAWPS train minus every validation question; BoolQ
validation rows with idx >= 1000 only, prompts rendered as the evaluation renders them). A
recipe takes a seeded sample of each pool (`data.sources[].num_samples`, `shuffle: true`), so
a larger calibration set is one override away. tests/test_build_experts.py checks the
committed files equal what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_experts  # noqa: E402  (the row builders the experts were trained with)

OUT = build_experts.ROOT / "recipes" / "data"


def lines(name: str) -> str:
    return "".join(json.dumps({"prompt": p, "response": r}, ensure_ascii=False) + "\n"
                   for p, r in build_experts.PAIRS[name]())


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in build_experts.PAIRS:
        path = OUT / f"{name}_calibration.jsonl"
        path.write_text(lines(name), encoding="utf-8")
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
