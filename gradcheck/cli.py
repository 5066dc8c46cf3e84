"""The `gradcheck` command line: parse options, call the library, print."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _selfcheck(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gradcheck.selfcheck import self_check

    console = Console()
    console.print(f"gradcheck self-check: seed {args.seed}, {args.cases} cases per regime and dtype")
    rows = self_check(seed=args.seed, cases=args.cases, dtypes=tuple(args.dtypes))
    table = Table("regime", "dtype", "cases", "max ULP", "median ULP", "bound held", "seconds")
    for r in rows:
        table.add_row(r.regime, r.dtype, str(r.cases), f"{r.max_ulp:g}", f"{r.median_ulp:g}",
                      "yes" if r.bound_held else "NO", f"{r.seconds:.2f}")
    console.print(table)
    ok = all(r.bound_held for r in rows)
    console.print("fast path within its error bound everywhere" if ok else "[red]error bound violated[/red]")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcheck",
        description="Reference oracle and verification harness for the softmax cross-entropy gradient.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "selfcheck",
        help="compare the fast oracle with the certified truth in every regime",
        description="Compare the fast float64 oracle with the certified (mpmath) truth on seeded cases in "
        "every regime, print the ULP errors, and check the oracle's running error bound.",
        epilog="example: gradcheck selfcheck --cases 50 --seed 1",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated cases (default 0)")
    p.add_argument("--cases", type=int, default=20, help="cases per regime and dtype (default 20)")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"],
                   choices=["float64", "float32", "float16", "bfloat16"], help="formats to check")
    p.set_defaults(run=_selfcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
