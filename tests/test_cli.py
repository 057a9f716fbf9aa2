import subprocess
import sys

from conftest import REPO


def test_bdsweep_list_shows_every_registered_method_of_every_kind():
    from bdsweep.registry import ARCHITECTURES, ATTACKS, DEFENSES, SOURCES

    result = subprocess.run([sys.executable, "-m", "bdsweep", "list"], capture_output=True, text=True, check=True,
                            cwd=REPO, env={"PYTHONPATH": str(REPO / "workflow"), "PATH": ""})
    lines = result.stdout.splitlines()
    assert lines[0] == "attacks:" and "dataset sources:" in lines
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines if line.startswith("  ")}
    for registry in (ATTACKS, ARCHITECTURES, DEFENSES, SOURCES):
        assert all(rows[entry.name] == entry.description for entry in registry.entries())
    assert len(rows) == sum(len(registry.names()) for registry in (ATTACKS, ARCHITECTURES, DEFENSES, SOURCES))


def test_validate_counts_the_grid(paper_workdir):
    result = subprocess.run([sys.executable, "-m", "bdsweep", "validate", str(REPO / "workflow/presets/paper.yaml")],
                            capture_output=True, text=True, check=True, cwd=paper_workdir,
                            env={"PYTHONPATH": str(REPO / "workflow"), "PATH": ""})
    # SPEC section 1: 288 backdoored models x (none + CLP + 14 defenses x 3 SPC x 10 seeds) + NC on the 96
    # CIFAR-10 models x 30; the same for the 12 clean models (4 on CIFAR-10): 129,600.
    assert "valid; 288 backdoored + 12 clean models, 129,600 runs" in result.stdout
