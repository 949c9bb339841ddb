"""Data-parallel training: 2 gloo ranks on CPU via torchrun, one model file, identical weights."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import potentials
from potentials import data

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path

    import potentials
    from potentials import train as trainmod

    config = json.loads(Path(sys.argv[1]).read_text())
    rank = os.environ["RANK"]
    original = potentials.save

    def save(*args, **kwargs):  # record who writes the model
        with open(config["work_dir"] + "/saves.log", "a") as f:
            f.write(rank + "\\n")
        return original(*args, **kwargs)

    potentials.save = save
    hash_weights = trainmod.weights_sha256

    def weights_sha256(model):  # called once per rank on its final weights: keep a copy of them
        import torch
        torch.save(model.state_dict(), config["work_dir"] + f"/weights-{rank}.pt")
        return hash_weights(model)

    trainmod.weights_sha256 = weights_sha256
    path = trainmod.train(config)
    Path(config["work_dir"], f"returned-{rank}.txt").write_text(str(path))
''')


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_rank_training_writes_one_model_with_identical_weights(tmp_path):
    dataset = tmp_path / "emt.xyz"
    data.generate(dataset, 16, seed=3, elements=("Pt", "C", "O"))
    work = tmp_path / "run"
    work.mkdir()
    config = dict(data=str(dataset), architecture="painn", model=dict(features=8, num_interactions=1, num_radial=8),
                  batch_size=4, max_steps=6, warmup_steps=2, val_every=3, lr=5e-3, seed=1, work_dir=str(work),
                  output=str(work / "model.eqm"), progress=False, plots=False, patience=100)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "run_train.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(tmp_path / "run_train.py"), str(tmp_path / "config.json")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # only rank 0 wrote the model; both ranks returned its path
    assert (work / "saves.log").read_text().split() == ["0"]
    assert (work / "returned-0.txt").read_text() == (work / "returned-1.txt").read_text() == config["output"]
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert len(metrics["rank_weights_sha256"]) == 2
    # each rank's final weights, as the rank held them (not the hashes training reports)
    ranks = [torch.load(work / f"weights-{r}.pt", weights_only=True) for r in (0, 1)]
    written = potentials.load(config["output"]).state_dict()
    untrained = potentials.build("painn", species=["C", "O", "Pt"], cutoff=5.0, seed=1, **config["model"]).state_dict()
    assert ranks[0].keys() == ranks[1].keys() == written.keys()
    for k in written:
        assert torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], written[k]), k
    assert any(not torch.equal(written[k], untrained[k]) for k in written if "scale_shift" not in k)  # it trained
