"""Screening throughput through Dask against the local batched run, on this machine.

The work: ``--slabs`` catalyst slabs of 37-40 atoms (``bench_md.slabs``: fcc(111) 3x3x4 of six
metals with O, CO or OH, two bottom layers fixed), each relaxed for exactly ``--steps`` FIRE steps
(``fmax`` 1e-9 eV/Å, never reached) with the shipped default model, so every configuration does
the same arithmetic. Throughput = atoms × model evaluations (steps + 1) / wall time, in
atom-steps/s. Configurations:

* ``local batch``: :func:`eqcalc.relax.relax` on all slabs as one batch in this process (what
  ``eqcalc relax`` does on one machine), torch at 1 and at 2 threads;
* ``in-process screen``: :func:`eqcalc.distributed.relax` without a client, the same batches as
  the cluster runs (``--batch-atoms``), rows written to a SQLite database: the machinery's cost;
* ``dask N worker(s)``: a ``LocalCluster`` of N worker processes with 1 thread each (Dask sets
  ``OMP_NUM_THREADS=1`` in its workers), same batches, same database writing.

Timed: the whole call (batching, dispatch, transfers, database rows), after a warm-up call that
loads the model in every process; cluster start-up is not timed. Each round runs every
configuration once, in turn, so a drifting load hits all alike; the median of ``--rounds`` is
reported. The database is fresh for each timed call (nothing skipped).

This machine has 2 CPU cores shared with other work: the 1-load average is recorded beside each
number. Two 1-thread workers can at best double one worker's throughput and no more than match a
2-thread local run; on N GPU workers, each with its own device, throughput adds up per worker
(batches are independent; the client only writes rows) until the client's row writing or the
scheduler (~1 ms per task) becomes the limit, far above GPU batch times of tens of ms.

    nice -n 10 .venv/bin/python benchmarks/bench_distributed.py            # ~10 min here
    .venv/bin/python benchmarks/bench_distributed.py --slabs 8 --steps 5 --rounds 1   # smoke run
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_md import slabs

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slabs", type=int, default=16)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-atoms", type=int, default=160, help="atoms per batch of the screening runs")
    p.add_argument("--model", default="default")
    p.add_argument("--output-dir", default=str(RESULTS))
    args = p.parse_args()

    from distributed import Client, LocalCluster

    from eqcalc.engine import md
    from eqcalc.engine.relax import relax
    from eqcalc.model import Model
    from eqcalc.workflows import distributed as dist

    structures = slabs(args.slabs)
    n_atoms = sum(len(s) for s in structures)
    atom_steps = n_atoms * (args.steps + 1)
    settings = dict(fmax=1e-9, max_steps=args.steps)
    ref = dist.ModelRef.of(args.model, device="cpu")
    model = Model(args.model, device="cpu", compile="eager")
    tmp = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    counter = iter(range(10 ** 6))
    default_threads = torch.get_num_threads()

    def local(threads):
        def run():
            torch.set_num_threads(threads)  # this benchmark's own process; restored below
            try:
                relax(structures, md.ModelPotential(model), **settings)
            finally:
                torch.set_num_threads(default_threads)
        return run

    def screening(client):
        def run():
            torch.set_num_threads(1)
            try:
                report = dist.relax(client, structures, ref, db=str(tmp / f"run{next(counter)}.db"),
                                    batch_atoms=args.batch_atoms, progress=False, **settings)
            finally:
                torch.set_num_threads(default_threads)
            assert report.done == len(structures), report.summary()
        return run

    clusters = {n: LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                silence_logs=40) for n in (1, 2)}
    clients = {n: Client(c) for n, c in clusters.items()}
    configs = [("local batch, 1 thread", 1, 1, local(1)), ("local batch, 2 threads", 1, 2, local(2)),
               ("in-process screen, 1 thread", 1, 1, screening(None)),
               ("dask 1 worker x 1 thread", 1, 1, screening(clients[1])),
               ("dask 2 workers x 1 thread", 2, 1, screening(clients[2]))]
    try:
        warm = slabs(2)
        for c in (None, *clients.values()):  # every process loads the model once, untimed
            dist.relax(c, warm, ref, db=None, fmax=1e-9, max_steps=1, progress=False)
        relax(warm, md.ModelPotential(model), fmax=1e-9, max_steps=1)
        times = {name: [] for name, *_ in configs}
        loads = {name: [] for name, *_ in configs}
        for r in range(args.rounds):
            for name, _, _, run in configs:
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
                loads[name].append(os.getloadavg()[0])
                print(f"round {r}: {name:30s} {times[name][-1]:7.2f} s  "
                      f"{atom_steps / times[name][-1]:8.0f} atom-steps/s  load {loads[name][-1]:.1f}", flush=True)
    finally:
        for c in clients.values():
            c.close()
        for c in clusters.values():
            c.close()

    base = atom_steps / statistics.median(times[configs[0][0]])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, workers, threads, _ in configs:
        seconds = statistics.median(times[name])
        rows.append({"config": name, "workers": workers, "threads_per_process": threads,
                     "batch_atoms": args.batch_atoms if "screen" in name or "dask" in name else n_atoms,
                     "slabs": len(structures), "atoms": n_atoms, "steps": args.steps, "rounds": args.rounds,
                     "median_s": round(seconds, 3), "atom_steps_per_s": round(atom_steps / seconds, 1),
                     "vs_local_1_thread": round(atom_steps / seconds / base, 3),
                     "load_avg_1min": round(statistics.median(loads[name]), 2), "model": args.model})
    with open(out / "distributed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "distributed.png")
    for row in rows:
        print(f"{row['config']:30s} {row['atom_steps_per_s']:9.0f} atom-steps/s  x{row['vs_local_1_thread']:.2f}  "
              f"(load {row['load_avg_1min']})")
    print(f"wrote {out / 'distributed.csv'} and {out / 'distributed.png'}")


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["config"] for r in rows]
    rates = [r["atom_steps_per_s"] for r in rows]
    colors = ["#dd8452" if "dask" in n else "#8c8c8c" if "screen" in n else "#4c72b0" for n in names]
    bars = ax.barh(names[::-1], rates[::-1], color=colors[::-1])
    for bar, r in zip(bars, rows[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" x{r['vs_local_1_thread']:.2f} (load {r['load_avg_1min']})", va="center", fontsize=8)
    ax.set_xlabel("atom-steps / s (FIRE relaxation, default model, CPU)")
    r0 = rows[0]
    ax.set_title(f"{r0['slabs']} slabs, {r0['atoms']} atoms, {r0['steps']} steps; 2-core shared machine, "
                 f"median of {r0['rounds']}", fontsize=9)
    ax.set_xlim(0, max(rates) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
