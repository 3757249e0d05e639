"""Mean and standard error of a recipe over its training seeds, from rows `bench/accuracy.py` wrote.

    python3 bench/seeds.py v8_f32_11ep_s17_trained v8_s0_agree_seed2 v8_s1_agree_seed2 ...
    python3 bench/seeds.py TEX_42 TEX_2 --against RECIPE_42 RECIPE_2    # paired by position

Each RUN is one run (one training seed) of the recipe, named as its rows are. Its rows are grouped
by what they were scored on: a random split (`split_seed`) or a held-out family (`family`). A run
whose rows have another name on each split (as session 16's `v8_s0_agree_seed2` and
`v8_s1_agree_seed2`) is given as both names joined by a comma; each group takes the row it finds
(two rows of one run for one group are an error). Per group the
script prints every row's mean DSB, its tissue images' score and the size test set's gaps where the
row has them (`dsb_x3`, `dsb_x0.5` minus the unscaled score), then the mean over the rows and its
standard error (sample standard deviation / sqrt(n)).

With `--against`, the i-th RUN is paired with the i-th baseline name (same training seed, same
split): the script prints, per group, each pair's difference and their mean and standard error, so
a change is judged against seed spread, not against one lucky run.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "docs" / "results.csv"


def group_of(row: pd.Series) -> str:
    """What a row was scored on: 'split seed N' or 'held out FAMILY'."""
    if isinstance(row.get("family"), str) and row["family"]:
        return f"held out {row['family']}"
    return f"split seed {int(row['split_seed'])}"


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean); the error is None for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _fmt(mean: float, se: float | None, n: int, sign: str = "") -> str:
    """'0.578 (0.004, 5)': a mean with its standard error and count (the mean alone for one value)."""
    return f"{mean:{sign}.3f}" if se is None else f"{mean:{sign}.3f} ({se:.3f}, {n})"


def load_rows(path: Path, runs: list[str]) -> pd.DataFrame:
    """The rows of `runs` (each one name, or names joined by commas) in the results file, with a
    `group` column and a `run` column (the run as given); a clear error when the file cannot be
    read, a name has no row, or one run has two rows for one group."""
    try:
        rows = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise SystemExit(f"error: cannot read results file {path}: {error}")
    missing_columns = {"name", "dsb", "split_seed", "family"} - set(rows.columns)
    if missing_columns:
        raise SystemExit(f"error: results file {path} lacks column(s) {', '.join(sorted(missing_columns))}")
    parts, present = [], set(rows["name"])
    for run in dict.fromkeys(runs):
        names = run.split(",")
        absent = [n for n in names if n not in present]
        if absent:
            raise SystemExit(f"error: no row named {', '.join(absent)} in {path}")
        part = rows[rows["name"].isin(names)].copy()
        part["run"] = run
        parts.append(part)
    rows = pd.concat(parts, ignore_index=True)
    rows["group"] = rows.apply(group_of, axis=1)
    twice = rows.groupby(["run", "group"]).size()
    twice = twice[twice > 1]
    if len(twice):
        run, group = twice.index[0]
        raise SystemExit(f"error: {path} has {twice.iloc[0]} rows of run {run} for {group}; give one row per run")
    return rows


def _value(row: pd.Series, column: str) -> float | None:
    value = row.get(column)
    return None if value is None or pd.isna(value) else float(value)


def row_values(row: pd.Series) -> dict[str, float | None]:
    """A row's mean DSB, tissue score and size-test gaps (scaled minus unscaled; None where absent)."""
    dsb = float(row["dsb"])
    x3, half = _value(row, "dsb_x3"), _value(row, "dsb_x0.5")
    return {"dsb": dsb, "tissue": _value(row, "dsb_tissue"),
            "x3 gap": None if x3 is None else x3 - dsb, "x0.5 gap": None if half is None else half - dsb}


def summarise(rows: pd.DataFrame, runs: list[str]) -> dict[str, dict[str, tuple[float, float | None, int]]]:
    """Print each group's rows and their means; return {group: {column: (mean, se, n)}}."""
    out: dict[str, dict[str, tuple[float, float | None, int]]] = {}
    for group in sorted(set(rows["group"])):
        part = rows[rows["group"] == group].set_index("run")
        print(f"{group}:")
        columns: dict[str, list[float]] = {}
        for run in [r for r in runs if r in part.index]:
            values = row_values(part.loc[run])
            print(f"  {part.loc[run, 'name']:34s} " + "  ".join(
                f"{key} {value:.3f}" for key, value in values.items() if value is not None))
            for key, value in values.items():
                if value is not None:
                    columns.setdefault(key, []).append(value)
        out[group] = {}
        for key, values in columns.items():
            mean, se = mean_se(values)
            out[group][key] = (mean, se, len(values))
        print("  mean (standard error, runs):  " + "  ".join(
            f"{key} {_fmt(mean, se, n)}" for key, (mean, se, n) in out[group].items()))
    return out


def paired(rows: pd.DataFrame, runs: list[str], against: list[str]) -> dict[str, tuple[float, float | None, int]]:
    """Print RUN - baseline for each pair with a row in a group; return {group: (mean, se, pairs)}."""
    out = {}
    for group in sorted(set(rows["group"])):
        part = rows[rows["group"] == group].set_index("run")
        diffs = []
        for run, base in zip(runs, against):
            if run in part.index and base in part.index:
                diffs.append(float(part.loc[run, "dsb"]) - float(part.loc[base, "dsb"]))
                print(f"  {group}: {part.loc[run, 'name']} - {part.loc[base, 'name']} = {diffs[-1]:+.3f}")
        if diffs:
            mean, se = mean_se(diffs)
            out[group] = (mean, se, len(diffs))
            print(f"{group}: mean difference {_fmt(mean, se, len(diffs), '+')}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="one run per training seed: its row name, or its names on each split joined by commas")
    parser.add_argument("--against", nargs="+", default=None, metavar="RUN",
                        help="baseline runs, paired with RUNs by position")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="CSV of benchmark rows")
    args = parser.parse_args(argv)
    if args.against is not None and len(args.against) != len(args.runs):
        raise SystemExit(f"error: --against gives {len(args.against)} runs for {len(args.runs)} RUNs; "
                         f"pair them one to one")
    path = Path(args.results)
    rows = load_rows(path, args.runs + (args.against or []))
    result = {"runs": summarise(rows[rows["run"].isin(args.runs)], args.runs)}
    if args.against:
        print("baseline:")
        result["baseline"] = summarise(rows[rows["run"].isin(args.against)], args.against)
        print("paired differences:")
        result["paired"] = paired(rows, args.runs, args.against)
    return result


if __name__ == "__main__":
    main()
