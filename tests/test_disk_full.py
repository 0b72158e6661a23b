"""A full disk during a write: one clear line, what was there before intact, and --resume once space is back.
The full disk is a real one: a small tmpfs (skipped where this process may not mount one)."""

import json
import subprocess
import sys

import pytest
import torch

from edgesafe.errors import DiskFullError
from edgesafe.io import atomic_dir, save_tensors, write_json
from edgesafe.training import Checkpoints

from .conftest import ROOT


def _mount(path, size: str, *, remount: bool = False) -> bool:
    options = f"remount,size={size}" if remount else f"size={size}"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB filesystem; ``small_disk.grow(size)`` gives it room."""
    path = tmp_path / "disk"
    path.mkdir()
    if not _mount(path, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")

    class Disk(type(path)):
        pass

    disk = Disk(path)
    disk.grow = lambda size: _mount(path, size, remount=True)
    yield disk
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(disk) -> None:
    """Take every free byte of ``disk``."""
    with open(disk / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


def test_state_files_and_folders_survive_a_full_disk(small_disk):
    write_json(small_disk / "report.json", {"figure": 1})
    save_tensors(small_disk / "weights.safetensors", {"w": torch.ones(4)})
    with atomic_dir(small_disk / "artefact") as partial:
        (partial / "model.onnx").write_bytes(b"first")
    _fill(small_disk)
    with pytest.raises(DiskFullError, match=r"report.json: no space left to write it; what was there before"):
        write_json(small_disk / "report.json", {"figure": 2, "pad": "x" * 100_000})
    with pytest.raises(DiskFullError, match="weights.safetensors: no space left"):
        save_tensors(small_disk / "weights.safetensors", {"w": torch.ones(100_000)})
    with pytest.raises(DiskFullError, match="artefact: no space left"):
        with atomic_dir(small_disk / "artefact") as partial:
            (partial / "model.onnx").write_bytes(b"x" * 1_000_000)
    assert json.loads((small_disk / "report.json").read_text()) == {"figure": 1}
    assert (small_disk / "artefact" / "model.onnx").read_bytes() == b"first"
    assert not (small_disk / "artefact.partial").exists()
    assert sorted(p.name for p in small_disk.iterdir()) == ["artefact", "filler", "report.json", "weights.safetensors"]


def test_a_checkpoint_that_finds_no_space_leaves_the_previous_one(small_disk):
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 64)).sum().backward()
    opt.step()
    checkpoints = Checkpoints(small_disk / "checkpoints")
    checkpoints.save(1, {"m": model}, {"adamw": opt})
    _fill(small_disk)
    with pytest.raises(DiskFullError, match="step-0000002.safetensors: no space left"):
        checkpoints.save(2, {"m": model}, {"adamw": opt})
    path, _, state, _ = checkpoints.load()
    assert path.name == "step-0000001.safetensors" and state["step"] == 1
    (small_disk / "filler").unlink()
    checkpoints.save(2, {"m": model}, {"adamw": opt})
    assert checkpoints.load()[2]["step"] == 2


def test_compress_on_a_full_disk_says_so_in_one_line_and_resumes_once_there_is_room(small_disk):
    run = small_disk / "run"
    base = [sys.executable, "-c", "from edgesafe.cli import run; run()", "--log-json", "prune", "--recipe",
            str(ROOT / "recipes" / "tiny-shapes.yaml"), "--out", str(run), "--set", "prune.importance=magnitude"]
    full = subprocess.run(base, capture_output=True, text=True, timeout=600)
    assert full.returncode == 2, full.stderr
    assert "no space left" in full.stderr and "Traceback" not in full.stderr + full.stdout
    assert len([line for line in full.stderr.splitlines() if line.strip()]) == 1, full.stderr
    assert json.loads((run / "0-teacher" / "stage.json").read_text())["status"] == "complete"
    assert small_disk.grow("256m")
    again = subprocess.run([*base, "--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    actions = {e["stage"]: e["action"] for e in map(json.loads, again.stdout.splitlines()) if e["event"] == "stage"}
    assert actions == {"teacher": "skip", "prune": "resume"}  # the interrupted stage, same inputs
    assert (run / "1-prune" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
