"""Mutation testing: does the test suite catch a broken implementation?

Each mutant in :mod:`mutants` (``benchmarks/mutation/mutants.py``) is one small, plausible bug:
an exact snippet of a source file replaced by a wrong one. For every mutant this runner

1. copies the tree (``git ls-files`` of ``--tree`` plus the compiled ``eqcalc/_native/*.so``)
   into a temporary folder (the working tree is never touched),
2. replaces the snippet (which must occur exactly once: otherwise the mutant is *stale* and is
   reported as such, e.g. after the code it targets was rewritten),
3. runs the mutant's tests there with pytest (``PYTHONPATH`` pointing at the copy) and reads
   the junit report: a mutant is *killed* when at least one test fails or errors, and the
   report names every test that killed it.

Before the mutants, the same test selections run once on the unmutated copy (the baseline):
a test that already fails there cannot kill anything and is reported.

    nice -n 10 python benchmarks/mutation/run.py                       # every mutant, this tree
    nice -n 10 python benchmarks/mutation/run.py --only md.langevin_dof # one mutant
    python benchmarks/mutation/run.py --list                            # what would run
    python benchmarks/mutation/run.py --plot                            # redraw mutation.png
    # the tests of an older commit against the same mutants ("before" numbers):
    git worktree add /tmp/before <commit>
    cp eqcalc/_native/*.so /tmp/before/eqcalc/_native/
    nice -n 10 python benchmarks/mutation/run.py --tree /tmp/before --label before
    # in a git worktree without build/: reuse the main checkout's nequip reference venv
    nice -n 10 python benchmarks/mutation/run.py --reference-build /path/to/main/build

With ``--tree`` pointing elsewhere, a mutant's test selection is cut to the test files and test
functions that exist there (``before`` numbers: the original tests, same mutants).

Results: ``benchmarks/results/mutation.csv`` (one row per mutant and label, rows of other labels
kept) and ``benchmarks/results/mutation_summary.csv`` (per module and label: killed / total,
killed by more than one test), drawn in ``benchmarks/results/mutation.png``.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from mutants import MUTANTS  # noqa: E402

FIELDS = ["label", "id", "module", "file", "status", "n_killing", "killing_tests", "n_tests",
          "seconds", "description"]


def tree_files(tree: Path):
    """Tracked and untracked (not ignored) files of ``tree``, plus the built cell list."""
    out = subprocess.run(["git", "-C", str(tree), "ls-files", "-co", "--exclude-standard"],
                         check=True, capture_output=True, text=True).stdout.split("\n")
    files = [f for f in out if f and (tree / f).is_file()]
    files += [str(p.relative_to(tree)) for p in (tree / "eqcalc" / "_native").glob("*.so")]
    return files


def copy_tree(tree: Path, files, dest: Path) -> Path:
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / f, target)
    return dest


#: Ignored (built) folders the tests reuse when present: the nequip reference venv and its results
#: (``tests/test_convert_nequip.py``). mace-torch's lives outside the tree (``~/.cache/eqcalc-reference``).
REFERENCE_DIRS = ("nequip-env", "nequip-reference")


def link_references(build: Path, copy: Path) -> None:
    """Symlink ``build/<name>`` for :data:`REFERENCE_DIRS` into ``copy/build`` (a copy of the
    tracked files has no build/: without the links the converter tests would rebuild the nequip
    venv and rerun nequip in every mutant's copy)."""
    for name in REFERENCE_DIRS:
        if (build / name).is_dir():
            (copy / "build").mkdir(exist_ok=True)
            (copy / "build" / name).symlink_to((build / name).resolve(), target_is_directory=True)


def select_tests(tree: Path, selection):
    """The part of a pytest selection (``file``, ``file::test`` or ``file::test[param]``) that
    exists in ``tree``: missing files and missing test functions are dropped."""
    kept = []
    for item in selection:
        path, _, node = item.partition("::")
        file = tree / path
        if not file.is_file():
            continue
        if node:
            name = node.split("[")[0].split("::")[-1]
            text = file.read_text()
            found = re.search(rf"^\s*def {re.escape(name)}\(", text, re.M)
            if not found:
                continue
            decorators = text[:found.start()].rstrip().split("\n\n")[-1]
            if "[" in node and "parametrize" not in decorators:
                item = f"{path}::{name}"  # parametrized in one tree, plain in the other
        if item not in kept:
            kept.append(item)
    return kept


def run_pytest(workdir: Path, selection, timeout: float, report: Path):
    """Run ``selection`` in ``workdir``; returns (failed test ids, n tests, seconds, status)."""
    # One OpenMP thread: with two or more, torch's threads spin-wait for each other on a busy
    # machine and a test can take 10-30x longer (measured); results do not depend on it.
    env = dict(os.environ, PYTHONPATH=str(workdir), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    env.pop("EQCALC_CACHE", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header",
           f"--junitxml={report}", *selection]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ["<timeout>"], 0, time.perf_counter() - start, "timeout"
    seconds = time.perf_counter() - start
    if not report.exists():  # pytest could not even start (import error in conftest, ...)
        return ["<pytest exit %d>" % proc.returncode], 0, seconds, "error"
    failed, n = [], 0
    for case in ET.parse(report).getroot().iter("testcase"):
        n += 1
        if case.find("failure") is not None or case.find("error") is not None:
            name = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
            failed.append(name)
    if proc.returncode in (4, 5):  # a node id that does not exist, or nothing collected
        return ["<pytest exit %d>" % proc.returncode], n, seconds, "error"
    if proc.returncode not in (0, 1):  # collection errors (a mutant that breaks imports), internal errors
        failed = failed or ["<pytest exit %d>" % proc.returncode]
    return failed, n, seconds, "ok"


def apply(workdir: Path, mutant) -> bool:
    path = workdir / mutant["file"]
    if not path.is_file():
        return False
    text = path.read_text()
    if text.count(mutant["original"]) != 1:
        return False
    path.write_text(text.replace(mutant["original"], mutant["mutated"]))
    return True


def rebuilt(workdir: Path, mutant) -> bool:
    """A mutant of compiled code (``.c``, ``.h``) rebuilt in its copy (the copied libraries are
    the pristine ones); False when it does not compile."""
    if not mutant["file"].endswith((".c", ".h")):
        return True
    for built in (workdir / "eqcalc" / "_native").glob("*.so"):
        built.unlink()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=workdir, capture_output=True)
    return proc.returncode == 0


def module_of(mutant) -> str:
    return mutant.get("module") or Path(mutant["file"]).stem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", default=str(REPO), help="source and tests to mutate (a git work tree)")
    parser.add_argument("--label", default="after", help="label of this run in the CSV (e.g. before, after)")
    parser.add_argument("--only", nargs="*", default=None, help="mutant ids (default: all)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per test run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    parser.add_argument("--plot", action="store_true", help="redraw mutation.png from the CSV, run nothing")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "mutation.csv"))
    parser.add_argument("--reference-build", default=None,
                        help="a build/ folder with nequip-env and nequip-reference (tests/test_convert_nequip.py's "
                             "reference venv and results), linked into each copy instead of rebuilt there; "
                             "default: the tree's own build/ (a git worktree without one: pass the main checkout's)")
    args = parser.parse_args(argv)
    tree = Path(args.tree).resolve()
    mutants = [m for m in MUTANTS if args.only is None or m["id"] in args.only]
    ids = [m["id"] for m in MUTANTS]
    if len(ids) != len(set(ids)):
        raise SystemExit("duplicate mutant ids in mutants.py")
    if args.plot:
        print(plot(Path(args.output)))
        return 0
    if args.list:
        for m in mutants:
            print(f"{m['id']:32s} {m['file']:34s} {' '.join(select_tests(tree, m['tests']))}")
        return 0

    files = tree_files(tree)
    scratch = Path(tempfile.mkdtemp(prefix="eqcalc-mutation-"))
    rows = []
    try:
        pristine = copy_tree(tree, files, scratch / "pristine")
        link_references(Path(args.reference_build) if args.reference_build else tree / "build", pristine)
        broken_at_baseline = set()
        if not args.no_baseline:
            union = sorted({t for m in mutants for t in select_tests(tree, m["tests"])})
            failed, n, seconds, status = run_pytest(pristine, union, args.timeout * 3, scratch / "baseline.xml")
            broken_at_baseline = set(failed)
            print(f"baseline: {n} tests in {seconds:.0f} s, {len(failed)} failing"
                  + (f": {failed}" if failed else ""), flush=True)
        for k, m in enumerate(mutants):
            selection = select_tests(tree, m["tests"])
            row = {"label": args.label, "id": m["id"], "module": module_of(m), "file": m["file"],
                   "description": m["description"], "n_tests": 0, "seconds": 0.0, "n_killing": 0,
                   "killing_tests": ""}
            work = scratch / f"m{k}"
            shutil.copytree(pristine, work, symlinks=True)  # the reference links stay links
            if not selection:
                row["status"] = "no tests"
            elif not apply(work, m):
                row["status"] = "stale"
            elif not rebuilt(work, m):
                row["status"] = "build error"
            else:
                failed, n, seconds, status = run_pytest(work, selection, args.timeout, scratch / f"m{k}.xml")
                killers = [f for f in failed if f not in broken_at_baseline]
                row.update(n_tests=n, seconds=round(seconds, 1), n_killing=len(killers),
                           killing_tests=";".join(killers),
                           status=status if status != "ok" else ("killed" if killers else "survived"))
                if status == "timeout":
                    row["status"], row["killing_tests"], row["n_killing"] = "killed (timeout)", "<timeout>", 1
            shutil.rmtree(work, ignore_errors=True)
            rows.append(row)
            print(f"[{k + 1}/{len(mutants)}] {m['id']:32s} {row['status']:9s} by {row['n_killing']:2d} "
                  f"of {row['n_tests']:3d} tests ({row['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_results(Path(args.output), rows, args.label, replace_all=args.only is None)
    plot(Path(args.output))
    killed = sum(r["status"].startswith("killed") for r in rows)
    print(f"{args.label}: {killed}/{len(rows)} mutants killed; results in {args.output}")
    return 0


def write_results(path: Path, rows, label: str, replace_all: bool) -> None:
    """Merge ``rows`` into the CSV (rows of other labels, and of other mutants when only some
    ran, are kept) and rewrite the per-module summary beside it."""
    old = []
    if path.exists():
        with open(path) as f:
            old = list(csv.DictReader(f))
    done = {r["id"] for r in rows}
    old = [r for r in old if r["label"] != label or (not replace_all and r["id"] not in done)]
    order = {m["id"]: k for k, m in enumerate(MUTANTS)}
    merged = sorted(old + rows, key=lambda r: (r["label"] != "before", r["label"], order.get(r["id"], 1e9)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in FIELDS} for r in merged)
    summary = {}
    for r in merged:
        s = summary.setdefault((r["label"], r["module"]), {"total": 0, "killed": 0, "multi": 0, "stale": 0})
        s["total"] += 1
        s["killed"] += str(r["status"]).startswith("killed")
        s["multi"] += int(r["n_killing"] or 0) > 1
        s["stale"] += r["status"] in ("stale", "no tests")
    with open(path.with_name(path.stem + "_summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "module", "mutants", "killed", "killed_by_2_or_more", "stale_or_no_tests"])
        for (lab, mod), s in sorted(summary.items(), key=lambda x: (x[0][0] != "before", x[0])):
            w.writerow([lab, mod, s["total"], s["killed"], s["multi"], s["stale"]])
        for lab in dict.fromkeys(k[0] for k in summary):
            tot = [s for (l2, _), s in summary.items() if l2 == lab]
            w.writerow([lab, "ALL", sum(s["total"] for s in tot), sum(s["killed"] for s in tot),
                        sum(s["multi"] for s in tot), sum(s["stale"] for s in tot)])


def plot(path: Path) -> Path:
    """``mutation.png`` beside the CSV: per module and label, mutants killed (by two or more
    tests apart from one) out of those the run could apply."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path.with_name(path.stem + "_summary.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["module"] != "ALL"]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    modules = sorted({r["module"] for r in rows})
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(modules) * len(labels) + 1.5))
    height = 0.8 / len(labels)
    for k, lab in enumerate(labels):
        by = {r["module"]: r for r in rows if r["label"] == lab}
        y = [m + k * height for m in range(len(modules))]
        # mutants a run could not apply (stale snippet, no selected test in that tree) are not
        # counted in its total: drawn hatched beyond it
        stale = [int(by[m]["stale_or_no_tests"]) if m in by else 0 for m in modules]
        total = [int(by[m]["mutants"]) - n if m in by else 0 for m, n in zip(modules, stale)]
        multi = [int(by[m]["killed_by_2_or_more"]) if m in by else 0 for m in modules]
        single = [int(by[m]["killed"]) - b if m in by else 0 for m, b in zip(modules, multi)]
        ax.barh(y, total, height, color="0.88", edgecolor="0.6")
        ax.barh(y, stale, height, left=total, color="white", edgecolor="0.75", hatch="///",
                label="not applicable in that tree" if k == 0 else None)
        ax.barh(y, multi, height, color=f"C{k}", label=f"{lab}: killed by 2+ tests")
        ax.barh(y, single, height, left=multi, color=f"C{k}", alpha=0.45, label=f"{lab}: killed by 1 test")
        for yy, t, b, s, n in zip(y, total, multi, single, stale):
            if t or n:
                ax.text(t + n + 0.1, yy, f"{b + s}/{t}" + (f" (+{n} n/a)" if n else ""), va="center", fontsize=8)
    ax.set_xlim(0, 1.12 * max(int(r["mutants"]) for r in rows) + 0.5)
    ax.set_yticks([m + 0.4 - height / 2 for m in range(len(modules))], modules)
    ax.invert_yaxis()
    ax.set_xlabel("mutants (grey: total)")
    killed = {lab: (sum(int(r["killed"]) for r in rows if r["label"] == lab),
                    sum(int(r["mutants"]) - int(r["stale_or_no_tests"]) for r in rows if r["label"] == lab))
              for lab in labels}
    ax.set_title("Mutants killed by the tests (of those applicable): "
                 + ", ".join(f"{lab} {a}/{b}" for lab, (a, b) in killed.items()))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
