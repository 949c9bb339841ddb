"""Screening throughput through Dask against the local batched run, on this machine.

The work: ``--slabs`` catalyst slabs of 37-40 atoms (``bench_md.slabs``: fcc(111) 3x3x4 of six
metals with O, CO or OH, two bottom layers fixed; each rattled by 0.02 Å with its own seed, so
no two inputs are identical and none is deduplicated), each relaxed for exactly ``--steps`` FIRE steps
(``fmax`` 1e-9 eV/Å, never reached) with the shipped default model, so every configuration does
the same arithmetic. Throughput = atoms × model evaluations (steps + 1) / wall time, in
atom-steps/s. Configurations:

* ``local batch``: :func:`eqcalc.relax.relax` on all slabs as one batch in this process (what
  ``eqcalc relax`` does on one machine), torch at 1 and at 2 threads;
* ``in-process screen``: :func:`eqcalc.distributed.relax` without a client, the same batches as
  the cluster runs (``--batch-atoms``), rows written to a SQLite database: the machinery's cost;
* ``dask N worker(s)``: a ``LocalCluster`` of N worker processes with 1 thread each (Dask sets
  ``OMP_NUM_THREADS=1`` in its workers), same batches, same database writing; as Dask starts
  them (``MALLOC_TRIM_THRESHOLD_=65536``) and with :data:`eqcalc.distributed.WORKER_ENV`.

Timed: the whole call (batching, dispatch, transfers, database rows), after a warm-up call that
loads the model in every process. Each dask configuration gets a fresh LocalCluster for its turn
(start-up and warm-up not timed, no idle cluster running beside another configuration). Each round
runs every configuration once, in turn, so a drifting load hits all alike; the median of
``--rounds`` is reported. The database is fresh for each timed call (nothing skipped).

CPU time is measured beside wall time (this process, which holds the LocalCluster's scheduler,
plus every worker process): atom-steps per CPU-second is the machinery's cost in a form that a
shared machine's load does not blur, wall-time throughput is what a user waits for.

This machine has 2 CPU cores shared with other work: the 1-minute load average is recorded beside
each number. Two 1-thread workers can at best double one worker's throughput and no more than match a
2-thread local run; on N GPU workers, each with its own device, throughput adds up per worker
(batches are independent; the client only writes rows) until the client's row writing or the
scheduler (~1 ms per task) becomes the limit, far above GPU batch times of tens of ms.

    nice -n 10 .venv/bin/python benchmarks/bench_distributed.py            # ~10 min here
    .venv/bin/python benchmarks/bench_distributed.py --slabs 8 --steps 5 --rounds 1   # smoke run
"""
from __future__ import annotations

import argparse
import contextlib
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
    for k, s in enumerate(structures):  # bench_md.slabs repeats every 6: identical inputs would be
        s.rattle(0.02, seed=k)          # computed once by the screening (same job key), not 16 times
    n_atoms = sum(len(s) for s in structures)
    atom_steps = n_atoms * (args.steps + 1)
    settings = dict(fmax=1e-9, max_steps=args.steps)
    ref = dist.ModelRef.of(args.model, device="cpu")
    model = Model(args.model, device="cpu", compile="eager")
    tmp = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    counter = iter(range(10 ** 6))
    default_threads = torch.get_num_threads()

    warm = slabs(2)

    @contextlib.contextmanager
    def local(threads):
        """Runs in this process with ``threads`` torch threads (this benchmark's own; restored)."""
        def run():
            relax(structures, md.ModelPotential(model), **settings)

        torch.set_num_threads(threads)
        try:
            relax(warm, md.ModelPotential(model), fmax=1e-9, max_steps=1)
            yield run, time.process_time
        finally:
            torch.set_num_threads(default_threads)

    @contextlib.contextmanager
    def screening(n_workers, env=None):
        """Runs through eqcalc.distributed: in this process (``None``) or on a fresh LocalCluster of
        ``n_workers`` processes (with ``env`` in their environment), started and warmed up (model
        loaded) before the clock starts."""
        torch.set_num_threads(1)
        cluster = client = None
        saved = dict(os.environ)  # a Nanny writes its pre-spawn environment into this process's
        try:
            if n_workers:
                os.environ.update(env or {})
                cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
                client = Client(cluster)
            dist.relax(client, warm, ref, db=None, fmax=1e-9, max_steps=1, progress=False)

            def run():
                report = dist.relax(client, structures, ref, db=str(tmp / f"run{next(counter)}.db"),
                                    batch_atoms=args.batch_atoms, progress=False, **settings)
                assert report.done == len(structures), report.summary()

            def cpu_seconds():  # this process (client, scheduler) and every worker process
                return time.process_time() + (sum(client.run(_process_cpu).values()) if client else 0.0)

            yield run, cpu_seconds
        finally:
            if client is not None:
                client.close()
                cluster.close()
            os.environ.clear()
            os.environ.update(saved)
            torch.set_num_threads(default_threads)

    configs = [("local batch, 1 thread", 1, 1, lambda: local(1)), ("local batch, 2 threads", 1, 2, lambda: local(2)),
               ("in-process screen, 1 thread", 1, 1, lambda: screening(None)),
               ("dask 1 worker x 1 thread", 1, 1, lambda: screening(1)),
               ("dask 2 workers x 1 thread", 2, 1, lambda: screening(2)),
               ("dask 1 worker, WORKER_ENV", 1, 1, lambda: screening(1, dist.WORKER_ENV)),
               ("dask 2 workers, WORKER_ENV", 2, 1, lambda: screening(2, dist.WORKER_ENV))]
    times = {name: [] for name, *_ in configs}
    cpu = {name: [] for name, *_ in configs}
    loads = {name: [] for name, *_ in configs}
    for r in range(args.rounds):
        for name, _, _, setup in configs:
            with setup() as (run, cpu_seconds):
                cpu0, start = cpu_seconds(), time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(cpu_seconds() - cpu0)
            loads[name].append(os.getloadavg()[0])
            print(f"round {r}: {name:30s} {times[name][-1]:7.2f} s  {cpu[name][-1]:7.2f} CPU-s  "
                  f"{atom_steps / times[name][-1]:8.0f} atom-steps/s  load {loads[name][-1]:.1f}", flush=True)

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
                     "median_cpu_s": round(statistics.median(cpu[name]), 3),
                     "atom_steps_per_cpu_s": round(atom_steps / statistics.median(cpu[name]), 1),
                     "load_avg_1min": round(statistics.median(loads[name]), 2), "model": args.model})
    with open(out / "distributed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "distributed.png")
    for row in rows:
        print(f"{row['config']:30s} {row['atom_steps_per_s']:9.0f} atom-steps/s  x{row['vs_local_1_thread']:.2f}  "
              f"{row['atom_steps_per_cpu_s']:9.0f} atom-steps/CPU-s  (load {row['load_avg_1min']})")
    print(f"wrote {out / 'distributed.csv'} and {out / 'distributed.png'}")


def _process_cpu() -> float:
    """CPU seconds (user + system) of the calling process: run on each worker."""
    t = os.times()
    return t.user + t.system


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    names = [r["config"] for r in rows]
    colors = ["#55a868" if "WORKER_ENV" in n else "#dd8452" if "dask" in n else "#8c8c8c" if "screen" in n
              else "#4c72b0" for n in names]
    for ax, key, label in ((axes[0], "atom_steps_per_s", "atom-steps / s (wall)"),
                           (axes[1], "atom_steps_per_cpu_s", "atom-steps / CPU-s (all processes)")):
        values = [r[key] for r in rows]
        bars = ax.barh(names[::-1], values[::-1], color=colors[::-1])
        for bar, r in zip(bars, rows[::-1]):
            note = f" x{r['vs_local_1_thread']:.2f}, load {r['load_avg_1min']}" if key == "atom_steps_per_s" else ""
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r[key]:,.0f}{note}", va="center",
                    fontsize=8)
        ax.set_xlabel(label)
        ax.set_xlim(0, max(values) * 1.5)
    r0 = rows[0]
    fig.suptitle(f"FIRE relaxation of {r0['slabs']} slabs ({r0['atoms']} atoms, {r0['steps']} steps), {r0['model']} "
                 f"model, 2-core shared CPU, median of {r0['rounds']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
