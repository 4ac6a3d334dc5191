"""The committed CacheQuant testbed (bench/testbed/ddpm-fmnist): present, checksummed, loadable.

No training here: the weights were made by ``bench/ddpm_train.py`` and exported with
``--export``; these tests check what a fresh clone gets.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bitpress.cache.testbed import CHECKSUM_FILE, read_checksums, sha256_file, verify_checksums
from bitpress.errors import SourceError

TESTBED = Path(__file__).resolve().parents[1] / "bench" / "testbed" / "ddpm-fmnist"
FILES = {"model_index.json", "scheduler/scheduler_config.json", "train_state.json",
         "unet/config.json", "unet/diffusion_pytorch_model.safetensors"}


def test_files_and_checksums():
    assert (TESTBED / CHECKSUM_FILE).is_file(), f"{TESTBED} is not committed"
    sums = read_checksums(TESTBED)
    assert set(sums) == FILES
    for rel, h in sums.items():
        assert sha256_file(TESTBED / rel) == h, rel
    assert verify_checksums(TESTBED) == sums
    assert not (TESTBED / "train_state.safetensors").exists()  # optimizer state is not shipped
    state = json.loads((TESTBED / "train_state.json").read_text())
    assert state["images"] > 0 and state["elapsed_s"] > 0 and state["commands"]
    assert all("ddpm_train.py" in c for c in state["commands"])
    assert state["export"]["dtype"] == "float16"


def test_weights_are_compact_float16():
    from safetensors import safe_open

    path = TESTBED / "unet" / "diffusion_pytorch_model.safetensors"
    assert path.stat().st_size < 6 * 2**20
    with safe_open(str(path), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        n = sum(f.get_tensor(k).numel() for k in f.keys())
    assert dtypes == {"F16"}
    assert 2_500_000 < n < 2_700_000


def test_loads_fp32_and_denoises():
    pytest.importorskip("diffusers")
    from bitpress.cache.cli import load_unet_and_scheduler

    torch.manual_seed(0)
    unet, sched = load_unet_and_scheduler(TESTBED, "ddim")
    assert {p.dtype for p in unet.parameters()} == {torch.float32}
    assert type(sched).__name__ == "DDIMScheduler" and sched.config.num_train_timesteps == 1000
    sched.set_timesteps(10)
    t = sched.timesteps[0]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        eps = unet(x, t).sample
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    # at the first step x_t is almost pure noise, so a trained model's noise estimate is close
    # to its input (an untrained U-Net's is not: relative error ~1 or more)
    rel = float((eps - x).norm() / x.norm())
    assert rel < 0.35, rel
    x_next = sched.step(eps, t, x).prev_sample
    assert x_next.shape == x.shape and torch.isfinite(x_next).all()


def test_refuses_changed_or_missing_file(tmp_path):
    pytest.importorskip("diffusers")
    from bitpress.cache.cli import load_unet_and_scheduler

    bad = tmp_path / "tb"
    shutil.copytree(TESTBED, bad)
    w = bad / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the last weight
    w.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="checksum mismatch.*diffusion_pytorch_model"):
        load_unet_and_scheduler(bad)
    w.unlink()
    with pytest.raises(SourceError, match="missing"):
        verify_checksums(bad)
    (bad / CHECKSUM_FILE).write_text("not a checksum line\n")
    with pytest.raises(SourceError, match="sha256"):
        verify_checksums(bad)
