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
first run computes the reference statistics of 5000 Fashion-MNIST test images, ~41
core-minutes, then caches them). Each row saves its samples (8-bit, the levels FID scores)
under ``--out``/samples and its record under ``--out``/rows, then FID is computed for all
rows; ``--no-fid`` stops after sampling and ``--score-only`` scores saved samples later, so
rows can be sampled by several single-threaded processes at once (``--rows`` subsets, same
``--out``). Wall-clock is images/s of the sampling loop only, with ``--threads`` torch
threads, recorded with the load average around it; MACs are per image over the whole
trajectory (``count_macs``).

The model defaults to the committed testbed ``bench/testbed/ddpm-fmnist`` (float16 on disk,
checked against its ``SHA256SUMS`` and upcast to float32 at load; any diffusers pipeline
folder works with ``--model``), the output to ``bench/results/diffusion-cpu``. On a CPU the
full protocol costs hours; ``--n`` (samples per row), ``--steps`` and ``--n-reference``
(Fashion-MNIST test images behind the reference statistics) shrink it, and every row records
the values it was made with (``protocol``; ``full_protocol`` is true only at 500/100/5000).

    .venv/bin/python bench/diffusion.py                                              # full
    .venv/bin/python bench/diffusion.py --rows fp,uniform --no-fid                   # sample some rows
    .venv/bin/python bench/diffusion.py --score-only                                 # then score
    .venv/bin/python bench/diffusion.py --n 8 --steps 10 --calib-n 4 --no-fid --out /tmp/d  # smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitpress.cache import (calibrate_cache, collect_calibration, collect_features, count_macs,  # noqa: E402
                            fit_quant_correction, quantize_unet, sample_loop, schedule_macs)
from bitpress.cache.cli import load_unet_and_scheduler  # noqa: E402
from bitpress.cache.fid import PROTOCOL, protocol_noise, protocol_scheduler  # noqa: E402
from bitpress.errors import BitpressError  # noqa: E402
from bitpress.cache.quant import DEFAULT_FLOAT_LAYERS  # noqa: E402
from _common import cpu_flags, cpu_model  # noqa: E402

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


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_samples(images: torch.Tensor, path: Path) -> None:
    """Samples in [-1, 1] stored as the 8-bit levels the FID protocol scores (atomic)."""
    from safetensors.torch import save_file

    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"samples": u8}, str(tmp))
    os.replace(tmp, path)


def load_samples(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["samples"].float() / 127.5 - 1.0


def model_id(model_dir: Path) -> str:
    """Which weights a row was sampled from (rows of different models never share a table)."""
    import hashlib

    h = hashlib.sha256((model_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    return h.hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent / "testbed" / "ddpm-fmnist"),
                    help="diffusers pipeline folder (default: the committed testbed)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    ap.add_argument("--n", type=int, default=PROTOCOL.n_samples, help="samples per row")
    ap.add_argument("--steps", type=int, default=PROTOCOL.num_inference_steps)
    ap.add_argument("--n-reference", type=int, default=PROTOCOL.n_reference,
                    help="first N Fashion-MNIST test images for the reference statistics")
    ap.add_argument("--interval", type=int, default=5, help="N: refresh budget K = ceil(T/N)")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--batch", type=int, default=PROTOCOL.batch_size)
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--calib-seed", type=int, default=1234)
    ap.add_argument("--float-layers", default=",".join(DEFAULT_FLOAT_LAYERS),
                    help="comma-separated convs/linears the quantized rows leave in float (quantize_unet's "
                         "exclude=; '' quantizes all; default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-fid", action="store_true", help="sample and time only")
    ap.add_argument("--score-only", action="store_true",
                    help="skip sampling: compute FID of the rows' saved samples in --out")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "diffusion-cpu"))
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows {bad}; choose from {ROWS}")
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    try:  # checksum (when the folder ships SHA256SUMS), then float16 -> float32
        unet, _ = load_unet_and_scheduler(model_dir)
    except BitpressError as e:
        print(f"diffusion.py: error: {e}", file=sys.stderr)
        return 2
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
    need_cache = not args.score_only and any(r != "fp" and not r.startswith("w") for r in rows)
    need_q = set() if args.score_only else {b for r in rows for b in (8, 4) if f"w{b}a8" in r}
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
    float_layers = [n.strip() for n in args.float_layers.split(",") if n.strip()]
    quant = {b: quantize_unet(unet, calib, wbits=b, exclude=float_layers) for b in sorted(need_q)}
    calib_s = time.perf_counter() - t0

    x0 = torch.zeros(1, *shape)
    macs = count_macs(unet, x0, int(sched.timesteps[0]), depth=args.depth)
    rows_dir, samples_dir = out / "rows", out / "samples"
    rows_dir.mkdir(exist_ok=True)
    samples_dir.mkdir(exist_ok=True)
    proto = {"model": model_id(model_dir), "n": args.n, "steps": T, "interval": args.interval, "depth": args.depth, "calib_n": args.calib_n,
             "calib_seed": args.calib_seed, "batch": args.batch, "n_reference": args.n_reference,
             "full_protocol": (args.n == PROTOCOL.n_samples and T == PROTOCOL.num_inference_steps
                               and args.n_reference == PROTOCOL.n_reference)}

    for row in ([] if args.score_only else rows):
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
        load0 = os.getloadavg()[0]
        t1 = time.perf_counter()
        for i in tqdm(range(0, args.n, args.batch), desc=row, unit="batch", disable=None):
            cache = plan.install(model) if plan is not None else None
            try:
                imgs.append(sample_loop(model, sched, noise[i:i + args.batch], T, cache=cache,
                                        depth=args.depth).clamp(-1, 1))
            finally:
                if cache is not None:
                    cache.disable()
        wall = time.perf_counter() - t1
        images = torch.cat(imgs)
        name = row.replace("+", "_")
        save_grid(images[:64], out / f"{name}.png")
        save_samples(images, samples_dir / f"{name}.safetensors")
        rec = {"row": row, "n": args.n, "steps": T, "images_per_s": args.n / wall, "wall_s": wall,
               "threads": args.threads, "load_before": load0, "load_after": os.getloadavg()[0],
               "n_full_steps": sum(mask), "macs_per_image": schedule_macs(macs, mask)["macs"],
               "mac_speedup": schedule_macs(macs, mask)["speedup"],
               "wbits": qh.wbits if qh is not None else None, "dec_quant": bool(qh is not None and qh.correction),
               "float_layers": float_layers if qh is not None else None,
               "protocol": proto, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        write_json(rows_dir / f"{name}.json", rec)
        print(json.dumps(rec), flush=True)

    if not args.no_fid:
        # FID after all sampling (the reference statistics are computed once and cached), from
        # the saved 8-bit samples -- the protocol rounds to 8 bits anyway, so this is lossless.
        from bitpress.cache.fid import InceptionFeatures, fid, load_fashion_mnist, reference_stats

        extractor = InceptionFeatures()
        fid_ref = reference_stats(load_fashion_mnist("test")[:args.n_reference], extractor=extractor)
        for row in rows:
            name = row.replace("+", "_")
            rp = rows_dir / f"{name}.json"
            if not rp.exists():
                print(f"{row}: no samples in {out} -- run it without --score-only first", file=sys.stderr)
                continue
            rec = json.loads(rp.read_text())
            if rec["protocol"] != proto:
                print(f"{row}: its samples were made with {rec['protocol']}, not {proto}; skipped", file=sys.stderr)
                continue
            rec["fid"] = fid(load_samples(samples_dir / f"{name}.safetensors"), fid_ref, extractor)
            write_json(rp, rec)
            print(f"{row}: FID {rec['fid']:.2f}", flush=True)

    results = [json.loads((rows_dir / f"{r.replace('+', '_')}.json").read_text())
               for r in ROWS if (rows_dir / f"{r.replace('+', '_')}.json").exists()]
    results = [r for r in results if r["protocol"] == proto]  # rows of another protocol stay on disk only
    fp = next((r for r in results if r["row"] == "fp"), None)
    print(f"\n{'row':<14} {'FID':>8} {'img/s':>8} {'speed-up':>9} {'GMAC/img':>9} {'MAC x':>6}")
    for r in results:
        sp = r["images_per_s"] / fp["images_per_s"] if fp else float("nan")
        fid_s = f"{r['fid']:8.2f}" if "fid" in r else f"{'-':>8}"
        print(f"{r['row']:<14} {fid_s} {r['images_per_s']:8.2f} {sp:9.2f} {r['macs_per_image'] / 1e9:9.3f} "
              f"{r['mac_speedup']:6.2f}")
    meta = {"machine": {"cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count(),
                        "torch": torch.__version__},
            "protocol": proto, "calibration_s": None if args.score_only else calib_s, "rows": results}
    write_json(out / "results.json", meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
