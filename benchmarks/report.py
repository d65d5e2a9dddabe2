"""Markdown, plots and the sections of benchmarks/RESULTS.md, regenerated from the committed CSVs.

    python -m benchmarks.report                    # .md (and .png) next to every CSV in results/
    python -m benchmarks.report --update-readme    # and RESULTS.md's sections between the markers

Each benchmark module formats its own CSVs; this step only finds them (smoke runs, named
``*-smoke_*``, never reach RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import common, cpu_linear_ce, cpu_path, kernels_report, serving

#: RESULTS.md marker name -> (CSV prefix, module); the sections appear in this order.
SECTIONS = {
    "bench:kernels": ("kernels_", kernels_report),
    "bench:serving": ("serving_", serving),
    "bench:cpu": ("cpu_path_", cpu_path),
    "bench:cpu-linear-ce": ("cpu_linear_ce_", cpu_linear_ce),
}


def update_readme(readme: Path = common.RESULTS_PAGE, results: Path = common.RESULTS_DIR) -> Path:
    """Rewrite the sections of the results page; a missing section after the first two
    (``bench:cpu``, ``bench:cpu-linear-ce``) is added after the one before it."""
    text = readme.read_text(encoding="utf-8")
    names = list(SECTIONS)
    for before, name in zip(names[1:], names[2:], strict=False):
        if f"<!-- {name}:start -->" not in text:
            end = f"<!-- {before}:end -->"
            markers = f"\n\n<!-- {name}:start -->\n<!-- {name}:end -->"
            text = text.replace(end, end + markers, 1)
    for name, (_, module) in SECTIONS.items():
        text = common.replace_section(text, name, module.readme_section(results))
    readme.write_text(text, encoding="utf-8")
    return readme


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--results", type=Path, default=common.RESULTS_DIR, help="folder of CSVs")
    ap.add_argument("--update-readme", action="store_true", help=f"rewrite {common.RESULTS_PAGE}")
    args = ap.parse_args(argv)
    for prefix, module in SECTIONS.values():
        for path in sorted(args.results.glob(f"{prefix}*.csv")):
            for written in module.write_report(path):
                print(f"wrote {written}")
    if args.update_readme:
        print(f"updated {update_readme(common.RESULTS_PAGE, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
