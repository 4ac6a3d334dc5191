"""``bitpress compress --method cachequant`` and ``bitpress sample`` on a tiny diffusers
pipeline directory built in the test: the written directory loads and samples, the PNG grid
has the expected size, and bad input gives one error line and no output."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402
from PIL import Image  # noqa: E402

from bitpress.cache.cli import image_grid  # noqa: E402
from bitpress.cache.quant import DEFAULT_FLOAT_LAYERS  # noqa: E402
from bitpress.cli import main  # noqa: E402
from conftest import tiny_plain_unet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddpm")
    tiny_plain_unet(sample_size=16).save_pretrained(d / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(d / "scheduler")
    return d


@pytest.mark.parametrize("wbits", [8, 32])
def test_compress_then_sample(pipe_dir, tmp_path, capsys, wbits):
    out = tmp_path / "cq"
    rc = main(["compress", str(pipe_dir), "--method", "cachequant", "--steps", "6",
               "--interval", "3", "--calib-samples", "2", "--wbits", str(wbits), "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["refresh_steps"][0] == 0 and len(summary["refresh_steps"]) == 2
    if wbits == 8:
        assert summary["float_layers"] == sorted(DEFAULT_FLOAT_LAYERS)
    png = tmp_path / "grid.png"
    assert main(["sample", str(out), "--n", "5", "--out", str(png)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 5 and res["images_per_s"] > 0
    img = Image.open(png)
    # 5 images -> 3 per row, 2 rows of 16 px with 2 px padding
    assert img.size == (3 * 18 + 2, 2 * 18 + 2)
    lo, hi = img.getextrema()
    assert hi > lo  # not blank


def test_compress_float_layers_option(pipe_dir, tmp_path, capsys):
    out = tmp_path / "cq"
    assert main(["compress", str(pipe_dir), "--method", "cachequant", "--steps", "4", "--interval", "2",
                 "--calib-samples", "1", "--float-layers", "conv_in, up_blocks.*.conv1", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "conv_in" in summary["float_layers"] and "up_blocks.0.resnets.0.conv1" in summary["float_layers"]
    meta = json.loads((out / "unet" / "quant.json").read_text())
    assert "conv_in" not in meta["layers"] and "conv_out" in meta["layers"]
    assert main(["compress", str(pipe_dir), "--method", "cachequant", "--steps", "4", "--interval", "2",
                 "--calib-samples", "1", "--float-layers", "", "--out", str(tmp_path / "all")]) == 0
    assert json.loads(capsys.readouterr().out)["float_layers"] == []


def test_image_grid_places_images():
    x = torch.full((3, 1, 4, 4), -1.0)
    x[1] = 1.0
    g = image_grid(x, nrow=2, pad=1)
    assert g.shape == (2 * 5 + 1, 2 * 5 + 1, 1)
    assert int(g[1:5, 6:10].min()) == 255 and int(g[1:5, 1:5].max()) == 0


@pytest.mark.parametrize("args,msg", [
    (["--wbits", "3"], "wbits"),
    (["--interval", "0"], "interval"),
    (["--schedule", "dps", "--scheduler", "ddim", "--steps", "0"], "steps"),
    (["--steps", "4", "--calib-samples", "1", "--float-layers", "conv_nope"], "matches no conv/linear"),
])
def test_bad_options_write_nothing(pipe_dir, tmp_path, capsys, args, msg):
    out = tmp_path / "cq"
    rc = main(["compress", str(pipe_dir), "--method", "cachequant", "--out", str(out), *args])
    assert rc == 2 and msg in capsys.readouterr().err
    assert not out.exists()


def test_not_a_diffusers_dir_and_existing_outputs(pipe_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compress", str(tmp_path / "empty"), "--method", "cachequant",
                 "--out", str(tmp_path / "o")]) == 2
    assert "no diffusers U-Net" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "exists").mkdir()
    assert main(["compress", str(pipe_dir), "--method", "cachequant",
                 "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["sample", str(pipe_dir), "--out", str(tmp_path / "g.png")]) == 2
    assert "not a CacheQuant directory" in capsys.readouterr().err
    assert main(["sample", str(pipe_dir), "--out", str(tmp_path / "g.jpg")]) == 2
