"""The diffusion side of the ``bitpress`` command.

* ``bitpress compress SRC --method cachequant --steps 100 --interval 5 --wbits 8 --abits 8``:
  SRC is a diffusers model directory (a pipeline directory with ``unet/`` and
  ``scheduler/``, or a bare ``UNet2DModel`` directory); the cache plan (DPS schedule + DEC)
  and the int8 U-Net are calibrated on ``--calib-samples`` seeded noise trajectories and
  written as one directory (:meth:`~bitpress.cache.plan.CacheQuantModel.save`, atomic).
* ``bitpress sample DIR --n 64 --out grid.png``: runs such a directory and writes a PNG grid.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, SourceError
from ..formats.checkpoint import check_output_path

SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler"}
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def _unet_dir(src: Path) -> Path:
    for d in (src / "unet", src):
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                cls = json.loads(cfg.read_text()).get("_class_name")
            except json.JSONDecodeError as e:
                raise SourceError(f"{cfg} is not valid JSON: {e}") from None
            if cls in UNET_CLASSES:
                return d
    raise SourceError(f"{src} holds no diffusers U-Net ({' or '.join(UNET_CLASSES)} config.json "
                      f"in {src}/unet or {src})")


def load_unet_and_scheduler(src: str | os.PathLike, scheduler: str = "ddim"):
    """The U-Net of a diffusers directory and a ``scheduler`` built from the directory's
    scheduler config (the training schedule: betas, timesteps) when it has one.

    A folder with a ``SHA256SUMS`` file (the shipped testbed) is checked against it first;
    float16 weights are upcast to float32 (:mod:`bitpress.cache.testbed`)."""
    from ..deps import require

    diffusers = require("diffusers", what="loading a diffusers U-Net")

    from .testbed import upcast_, verify_checksums

    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"{src} is not a directory")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}")
    verify_checksums(src)
    ud = _unet_dir(src)
    cls = json.loads((ud / "config.json").read_text())["_class_name"]
    try:
        unet = upcast_(getattr(diffusers, cls).from_pretrained(ud)).eval()
    except Exception as e:  # noqa: BLE001 - diffusers raises many types
        raise SourceError(f"cannot load the U-Net in {ud}: {e}") from None
    sched_cls = getattr(diffusers, SCHEDULERS[scheduler])
    sd = src / "scheduler"
    if (sd / "scheduler_config.json").is_file():
        sched = sched_cls.from_config(sched_cls.load_config(sd))
    else:
        sched = sched_cls()
    return unet, sched


def _noise(unet: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_channels, *size, generator=g)


def compress_cachequant(args: Any) -> dict[str, Any]:
    """``bitpress compress --method cachequant``; returns the summary that is printed."""
    import time

    from .plan import cachequant
    from .quant import EXCLUDED

    out = Path(args.out)
    check_output_path(out, [args.src], args.force)
    for name in ("steps", "interval", "calib_samples"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if args.wbits not in (4, 8, 32) or args.abits != 8:
        raise ConfigError("cachequant supports --wbits 8 or 4 (32: no quantization) with "
                          "--abits 8")
    t0 = time.time()
    unet, sched = load_unet_and_scheduler(args.src, args.scheduler)
    noise = _noise(unet, args.calib_samples, args.seed)
    cq = cachequant(unet, sched, noise, args.steps, args.interval,
                    wbits=None if args.wbits == 32 else args.wbits, abits=args.abits,
                    kind=args.schedule, dec=not args.no_dec, progress=True,
                    float_layers=None if args.float_layers is None else
                    [n.strip() for n in args.float_layers.split(",") if n.strip()])
    cq.save(out, overwrite=args.force)
    return {"source": str(args.src), "out": str(out), "method": "cachequant",
            "steps": args.steps, "interval": args.interval, "schedule": args.schedule,
            "refresh_steps": [i for i, r in enumerate(cq.plan.mask) if r],
            "wbits": args.wbits, "abits": args.abits, "dec": not args.no_dec,
            "float_layers": None if cq.quant is None else sorted(n for n, why in cq.quant.float_layers.items()
                                                                 if why == EXCLUDED),
            "calib_samples": args.calib_samples, "seed": args.seed,
            "seconds": round(time.time() - t0, 1)}


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """``[n, C, H, W]`` images in [-1, 1] -> one ``[H', W', C]`` uint8 grid."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    grid = torch.zeros(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    x = ((images.float().clamp(-1, 1) + 1) / 2)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0)


def sample(args: Any) -> dict[str, Any]:
    """``bitpress sample DIR --n N --out grid.png``."""
    import time

    from ..deps import require
    from .plan import load_cachequant

    Image = require("PIL.Image", what="bitpress sample (writes a PNG)")

    if args.n < 1:
        raise ConfigError("--n must be positive")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out must be a .png file, got {out}")
    check_output_path(out, [args.dir], args.force, kind="file")
    cq = load_cachequant(args.dir)
    noise = _noise(cq.unet, args.n, args.seed)
    t0 = time.time()
    with torch.no_grad():
        imgs = cq.sample(noise, progress=True)
    dt = time.time() - t0
    grid = image_grid(imgs)
    arr = grid.numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bitpress-", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        img.save(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"dir": str(args.dir), "out": str(out), "n": args.n, "seed": args.seed,
            "seconds": round(dt, 2), "images_per_s": round(args.n / dt, 3)}
