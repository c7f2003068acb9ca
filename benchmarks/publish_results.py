"""Copy the small files of a grid's finished runs into a folder that is committed (no weights).

    python benchmarks/publish_results.py runs/elpv_grid docs/results/elpv

A later `rifle bench benchmarks/elpv_grid.yaml --out docs/results/elpv` skips every published run
(its summary.json says complete) and runs only the rest.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SMALL = ("config.yaml", "metrics.jsonl", "summary.json", "depth.jsonl", "train.log")


def publish(src: Path, dst: Path) -> int:
    n = 0
    for summary in sorted(src.rglob("summary.json")):
        if not json.loads(summary.read_text()).get("complete"):
            continue
        run = summary.parent
        target = dst / run.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in SMALL:
            if (run / name).is_file():
                shutil.copy2(run / name, target / name)
        n += 1
    for name in ("grid.yaml",):
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
    return n


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(f"published {publish(Path(sys.argv[1]), Path(sys.argv[2]))} finished runs to {sys.argv[2]}")
