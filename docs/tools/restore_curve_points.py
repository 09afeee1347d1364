"""Put a committed curve's finished points back into a run folder, so that ``alignsam curve``
reads them instead of training them again (issue 30: run folders live on one machine, the
committed ``docs/results/curve_*`` outlive it).

For every point of ``DOCS/results.json`` whose benchmark is committed as
``DOCS/nNNNN_sS/results.json``, writes ``RUN/nNNNN_sS/benchmark/results.json`` and
``RUN/nNNNN_sS/point.json`` (its record, marked ``restored_from``), and a committed
``--confirm`` benchmark (``DOCS/nNNNN_sS/confirm_*/results.json``) beside it; points already in
RUN are left alone.

    python docs/tools/restore_curve_points.py docs/results/curve_kvasir runs/curve_kvasir
    alignsam curve kvasir_polyp_lookahead --sizes 25 50 100 200 400 --out runs/curve_kvasir ...
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def restore(docs: Path, run: Path) -> list[str]:
    """The names of the points restored from ``docs`` into ``run``."""
    done = []
    for record in json.loads((docs / "results.json").read_text())["points"]:
        name = Path(record["folder"]).name
        bench = docs / name / "results.json"
        target = run / name
        if not bench.is_file() or (target / "point.json").is_file():
            continue
        (target / "benchmark").mkdir(parents=True, exist_ok=True)
        shutil.copy(bench, target / "benchmark" / "results.json")
        record = {**record, "restored_from": str(docs / name)}
        record.setdefault("budgets", None)
        (target / "point.json").write_text(json.dumps(record, indent=2))
        for confirm in (docs / name).glob("confirm_*/results.json"):
            (target / confirm.parent.name).mkdir(exist_ok=True)
            shutil.copy(confirm, target / confirm.parent.name / "results.json")
        done.append(name)
    return done


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    names = restore(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"restored {len(names)} points: {', '.join(names) or '-'}")
