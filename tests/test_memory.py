"""eqcalc.memory: freed step temporaries are reused from the heap instead of page-faulted anew,
and the eqcalc command sets it for its own process."""
import subprocess
import sys

import pytest

from eqcalc import cli

PROBE = """
import resource, sys, torch
from eqcalc.memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(2 ** 24, dtype=torch.float64)   # a 128 MiB per-edge temporary, written
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(sum([faults_of_a_step() for _ in range(10)][2:]))   # steps 3-10, after the heap has grown
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_temporary_is_reused_without_page_faults():
    pages = 2 ** 27 // 4096
    faults = {mode: int(subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "reuse")}
    assert faults["default"] > 7 * pages     # glibc maps and unmaps it at every one of 8 steps
    assert faults["reuse"] < 2.5 * pages     # later steps find it in the heap (glibc may move it once or twice)


def test_the_eqcalc_command_reuses_freed_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("eqcalc.memory.reuse_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["convert", "--help"]) == 0 and calls == []   # --help runs nothing
    assert cli.main(["convert", str(tmp_path / "missing.model"), str(tmp_path / "m.eqm")]) == 2
    assert calls == [1]
