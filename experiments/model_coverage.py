"""The README's model coverage table, generated: every model of the test zoo through ``inrun.check_model``.

For each case of tests/zoo_models.py (tiny configs, random weights, no downloads) this builds the model and runs
:func:`inrun.check_model` on its training batch, which probes sample independence, checks the captured per-sample
gradients against autograd and compares them with ``torch.func`` per parameter. A model is ``exact`` when the check
passes for every trainable parameter, ``refused`` when inrun declines it (the error or the reason is shown). The route
counts say how many parameter tensors go through each route (ghost, materialised, fallback, refused), and the
maximum relative error is the largest of check_model's per-parameter errors against ``torch.func``.

The table is written between the ``<!-- coverage:start -->`` and ``<!-- coverage:end -->`` markers of README.md
(nothing else in the file changes). Run from the repo root::

    .venv/bin/python -m experiments.model_coverage               # rewrite README.md's table
    .venv/bin/python -m experiments.model_coverage --print-only  # print it
    .venv/bin/python -m experiments.model_coverage --cases gpt2 llama --readme /tmp/README.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import inrun
from inrun.errors import InRunError

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"
ROUTES = ("ghost", "materialised", "fallback", "refused")


def zoo_cases() -> list[Any]:
    """The zoo's cases (tests/zoo_models.py, importable from the repo root)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.zoo_models import CASES

    return CASES


def first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence of an error message (whitespace collapsed), at most ``limit`` characters."""
    line = " ".join(str(text).split())
    if ". " in line:
        line = line[: line.index(". ") + 1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def first_clause(text: str) -> str:
    """The part of a reason before its explanation (``"the gradients do not add up: ..."`` -> the first half)."""
    return first_sentence(str(text).split(": ")[0], 100)


def check_case(case: Any) -> dict[str, Any]:
    """Run ``inrun.check_model`` on one zoo case; the row of the coverage table."""
    model, loss_fn, train, _ = case.build()
    row: dict[str, Any] = {"name": case.name, "description": case.description, "expected": case.expect}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check = inrun.check_model(model, loss_fn, train, print_table=False)
    except InRunError as error:
        row.update(verdict="refused", reason=f"{type(error).__name__}: {first_sentence(error)}", routes={},
                   max_rel_error=None)
    else:
        counts = {route: sum(1 for r in check.rows if r.route == route) for route in ROUTES}
        errors = [float(r.max_rel_error) for r in check.rows
                  if r.max_rel_error is not None and math.isfinite(float(r.max_rel_error))]
        reasons = []
        if check.mixing:
            reasons.append(f"samples mixed: {first_sentence(check.mixing, 100)}")
        if getattr(check, "error", None):
            reasons.append(first_sentence(check.error, 100))
        inexact = [r for r in check.rows if r.route != "refused" and not r.exact]
        if inexact:
            more = f" (and {len(inexact) - 1} more)" if len(inexact) > 1 else ""
            reasons.append(f"`{inexact[0].parameter}`{more}: {first_clause(inexact[0].reason)}")
        row.update(verdict="exact" if check.ok else "refused", routes=counts,
                   max_rel_error=max(errors) if errors else None, reason=reasons[0] if reasons else "")
    row["seconds"] = time.perf_counter() - start
    return row


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | what it exercises | verdict | routes (ghost / materialised / fallback / refused) | "
             "max relative error | reason |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        routes = " / ".join(str(row["routes"].get(route, 0)) for route in ROUTES) if row["routes"] else "-"
        error = f"{row['max_rel_error']:.1e}" if row["max_rel_error"] is not None else "-"
        reason = row["reason"].replace("|", "\\|") if row["reason"] else ""
        lines.append(f"| {row['name']} | {row['description']} | **{row['verdict']}** | {routes} | {error} | {reason} |")
    return "\n".join(lines)


def rewrite(readme: Path, table: str) -> None:
    """Replace what is between the markers of ``readme`` by ``table`` (the markers must be there, once each)."""
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{readme}: needs one {START} line followed by one {END} line around the coverage table")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--cases", nargs="*", default=None, help="names of zoo cases (default: all)")
    parser.add_argument("--print-only", action="store_true", help="print the table, leave the README alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = zoo_cases()
    if args.cases:
        unknown = sorted(set(args.cases) - {case.name for case in cases})
        if unknown:
            raise SystemExit(f"--cases: unknown {unknown}; the zoo has {[case.name for case in cases]}")
        cases = [case for case in cases if case.name in args.cases]
    rows = []
    for case in cases:
        row = check_case(case)
        rows.append(row)
        agrees = row["verdict"] in row["expected"].split("-or-")
        print(f"{case.name:22s} {row['verdict']:8s} ({row['seconds']:.1f} s)"
              + ("" if agrees else f"   <-- expected {row['expected']}"), file=sys.stderr)
    table = render(rows)
    print(table)
    if not args.print_only:
        rewrite(args.readme, table)
        print(f"wrote the table into {args.readme}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
