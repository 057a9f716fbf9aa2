import subprocess
import sys

from conftest import REPO


def test_bdsweep_list_shows_every_kind_and_what_is_implemented():
    result = subprocess.run([sys.executable, "-m", "bdsweep", "list"], capture_output=True, text=True, check=True,
                            cwd=REPO, env={"PYTHONPATH": str(REPO / "workflow"), "PATH": ""})
    lines = result.stdout.splitlines()
    assert lines[0] == "attacks:" and "dataset sources:" in lines
    rows = {line.split()[0]: line.split()[1] for line in lines if line.startswith("  ")}
    assert all(rows[a] == "implemented" for a in ("badnets", "blended", "sig", "lf", "ssba", "iab", "wanet", "bpp"))
    assert rows["ft"] == rows["clp"] == rows["none"] == rows["sau"] == "implemented"
    assert rows["preact_resnet18"] == rows["small_cnn"] == "implemented" and rows["vgg19_bn"] == "implemented"
    assert all(rows[s] == "implemented" for s in ("cifar10", "gtsrb", "tiny-imagenet", "npz", "digits"))
    assert len(rows) == 8 + 5 + 17 + 5


def test_validate_counts_the_grid():
    result = subprocess.run([sys.executable, "-m", "bdsweep", "validate", "workflow/presets/paper.yaml"],
                            capture_output=True, text=True, check=True, cwd=REPO,
                            env={"PYTHONPATH": str(REPO / "workflow"), "PATH": ""})
    assert "valid;" in result.stdout and "not implemented yet (skipped)" in result.stdout
