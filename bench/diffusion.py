"""CacheQuant benchmark (issue 8, item 7) -- skeleton: rows, timing, MACs, grids, JSON.

Rows (all from the same initial noise, ``bitpress.cache.fid.protocol_noise``):

    fp            full-precision U-Net at every step
    uniform       DeepCache uniform schedule, every N-th step refreshes
    dps           CacheQuant's DP schedule (same refresh budget K = ceil(T/N))
    dps+dec       DPS + DEC (cache-error correction of the cached feature)
    dps+dec+w8a8  ... + W8A8 int8 U-Net + DEC of the quantization error
    w8a8          W8A8 int8 U-Net at every step
    w4a8          W4A8 int8 U-Net at every step
    dps+dec+w4a8  DPS + DEC + W4A8 + quantization-error DEC

Calibration (schedule features, DEC, activation ranges) uses its own noise (``--calib-seed``),
never the evaluation noise. Quantized rows run real int8 kernels (``bitpress.cache.quant``).
FID follows ``bitpress.cache.fid`` (the full protocol is 500 samples, 100 DDIM steps; the
first run computes the Fashion-MNIST test statistics, ~80 core-minutes, then caches them).
``--no-fid`` skips it (smoke runs). Wall-clock is images/s of the sampling loop only, with
``--threads`` torch threads; MACs are per image over the whole trajectory (``count_macs``).

    .venv/bin/python bench/diffusion.py --model bench/models/ddpm-fmnist             # full
    .venv/bin/python bench/diffusion.py --n 8 --steps 10 --calib-n 4 --no-fid         # smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitpress.cache import (calibrate_cache, collect_calibration, collect_features, count_macs,  # noqa: E402
                            fit_quant_correction, quantize_unet, sample_loop, schedule_macs)
from bitpress.cache.fid import PROTOCOL, protocol_noise, protocol_scheduler  # noqa: E402

ROWS = ("fp", "uniform", "dps", "dps+dec", "dps+dec+w8a8", "w8a8", "w4a8", "dps+dec+w4a8")


def save_grid(images: torch.Tensor, path: Path, ncol: int = 8) -> None:
    """PNG grid of images in [-1, 1] ``[n, 1|3, H, W]`` (written atomically)."""
    from PIL import Image

    n, c, h, w = images.shape
    nrow = math.ceil(n / ncol)
    grid = torch.zeros(c, nrow * h, ncol * w)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = images[i]
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    img = Image.fromarray(arr[0].numpy(), "L") if c == 1 else Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")
    tmp = path.with_name(f".{path.name}.tmp.png")
    img.save(tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent / "models" / "ddpm-fmnist"))
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    ap.add_argument("--n", type=int, default=PROTOCOL.n_samples, help="samples per row")
    ap.add_argument("--steps", type=int, default=PROTOCOL.num_inference_steps)
    ap.add_argument("--interval", type=int, default=5, help="N: refresh budget K = ceil(T/N)")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--batch", type=int, default=PROTOCOL.batch_size)
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--calib-seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-fid", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "diffusion"))
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows {bad}; choose from {ROWS}")
    torch.set_num_threads(args.threads)
    from diffusers import UNet2DModel

    model_dir = Path(args.model)
    unet = UNet2DModel.from_pretrained(model_dir / "unet").eval()
    sched_cfg = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    sched = protocol_scheduler(sched_cfg)
    T = args.steps  # DDIM: one U-Net evaluation per step
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    noise = protocol_noise(shape, args.n)
    calib_noise = torch.randn((args.calib_n, *shape), generator=torch.Generator().manual_seed(args.calib_seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- calibration (shared by the rows) ---------------------------------------------------
    t0 = time.perf_counter()
    need_cache = any(r != "fp" and not r.startswith("w") for r in rows)
    need_q = {b for r in rows for b in (8, 4) if f"w{b}a8" in r}
    feats = collect_features(unet, sched, calib_noise, T, args.depth) if need_cache else None
    plans = {}
    if need_cache:
        plans["uniform"] = calibrate_cache(unet, sched, calib_noise, T, args.interval, "uniform", args.depth,
                                           dec=False, features=feats)
        plans["dps"] = calibrate_cache(unet, sched, calib_noise, T, args.interval, "dps", args.depth,
                                       dec=False, features=feats)
        plans["dps+dec"] = calibrate_cache(unet, sched, calib_noise, T, args.interval, "dps", args.depth,
                                           dec=True, features=feats)
    calib = collect_calibration(unet, sched, calib_noise, T) if need_q else None
    quant = {b: quantize_unet(unet, calib, wbits=b) for b in sorted(need_q)}
    calib_s = time.perf_counter() - t0

    x0 = torch.zeros(1, *shape)
    macs = count_macs(unet, x0, int(sched.timesteps[0]), depth=args.depth)
    fid_ref = None
    if not args.no_fid:
        from bitpress.cache.fid import InceptionFeatures, fid, reference_stats

        extractor = InceptionFeatures()
        fid_ref = reference_stats(extractor=extractor)

    results = []
    for row in rows:
        model, plan, qh = unet, None, None
        if row.startswith("dps+dec"):
            plan = plans["dps+dec"]
        elif row in ("uniform", "dps"):
            plan = plans[row]
        for b in (8, 4):
            if f"w{b}a8" in row:
                qh = quant[b]
                model = qh.unet
                qh.remove_correction()
                if plan is not None:
                    fit_quant_correction(qh, unet, calib, plan.mask, args.depth)
        mask = plan.mask if plan is not None else [True] * T
        imgs = []
        t1 = time.perf_counter()
        for i in range(0, args.n, args.batch):
            cache = plan.install(model) if plan is not None else None
            try:
                imgs.append(sample_loop(model, sched, noise[i:i + args.batch], T, cache=cache,
                                        depth=args.depth).clamp(-1, 1))
            finally:
                if cache is not None:
                    cache.disable()
        wall = time.perf_counter() - t1
        images = torch.cat(imgs)
        save_grid(images[:64], out / f"{row.replace('+', '_')}.png")
        rec = {"row": row, "n": args.n, "steps": T, "images_per_s": args.n / wall, "wall_s": wall,
               "n_full_steps": sum(mask), "macs_per_image": schedule_macs(macs, mask)["macs"],
               "mac_speedup": schedule_macs(macs, mask)["speedup"],
               "wbits": qh.wbits if qh is not None else None, "dec_quant": bool(qh is not None and qh.correction)}
        if fid_ref is not None:
            rec["fid"] = fid(images, fid_ref, extractor)
        results.append(rec)
        print(json.dumps(rec), flush=True)
    fp = next((r for r in results if r["row"] == "fp"), None)
    print(f"\n{'row':<14} {'FID':>8} {'img/s':>8} {'speed-up':>9} {'GMAC/img':>9}")
    for r in results:
        sp = r["images_per_s"] / fp["images_per_s"] if fp else float("nan")
        fid_s = f"{r['fid']:8.2f}" if "fid" in r else f"{'-':>8}"
        print(f"{r['row']:<14} {fid_s} {r['images_per_s']:8.2f} {sp:9.2f} {r['macs_per_image'] / 1e9:9.3f}")
    meta = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "threads": args.threads, "torch": torch.__version__},
            "protocol": {"n": args.n, "steps": T, "interval": args.interval, "depth": args.depth,
                         "calib_n": args.calib_n, "fid": not args.no_fid, "full_protocol":
                         args.n == PROTOCOL.n_samples and T == PROTOCOL.num_inference_steps},
            "calibration_s": calib_s, "rows": results}
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
