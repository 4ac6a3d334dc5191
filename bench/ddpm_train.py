"""Train the CacheQuant testbed: a small DDPM on Fashion-MNIST, on CPU or a GPU, time-budgeted.

No pretrained image diffusion model is available offline, so bitpress trains its own
(issue 8, item 1). The model is a diffusers ``UNet2DModel`` with skip connections at the
native 28x28 resolution (28 -> 14 -> 7, so no padding is needed), one channel, pixels
scaled to [-1, 1], trained with the DDPM noise-prediction loss under diffusers'
``DDPMScheduler`` (1000 steps, linear betas).

Design choices, and why:

* Channels (16, 64, 128), one resnet per level, self-attention only at 7x7: about 2.6 M
  parameters. The shallowest level is deliberately thin (16 channels) so that the
  DeepCache shallow branch (conv_in, first down block, last up block, head) costs about
  9 % of a full step -- caching can then actually pay off, as it does on real U-Nets.
  One core trains ~30 images/s on a quiet machine (``--bench-iters 5``: 32 img/s at batch 32,
  30 at batch 64) and 8-11 under a load average of 10-15, so a CPU hour sees 0.5-1.8
  epochs; a bigger model would see less data and be worse at this budget.
* Batch 32, lr 5e-4 (the defaults) on CPU: per-image throughput is flat from 32 to 64, so
  the smaller batch gives twice the optimizer steps in a fixed budget; a GPU run uses
  ``--batch-size 128`` (and ``--ema-decay 0.999``, its many more steps).
* AdamW with a short warm-up and constant learning rate, EMA of the weights (the EMA
  weights are what gets saved as the model).
* Deterministic: data order is a seeded permutation per epoch and the noise of step s
  comes from a generator seeded with (seed, s), so a resumed run continues exactly the
  sequence an uninterrupted run would have drawn.
* Time-budgeted and resumable: ``--minutes M`` stops cleanly after M minutes; a
  checkpoint is written atomically (temp dir, then rename) every ``--ckpt-every``
  minutes and at the end; ``--resume`` reloads model, EMA, **optimizer state** (Adam
  moments saved as plain tensors in safetensors) and the position in the data stream.

Output directory layout (a diffusers ``DDPMPipeline`` directory plus training state)::

    model_index.json, unet/{config.json, diffusion_pytorch_model.safetensors}  (EMA weights)
    scheduler/scheduler_config.json
    train_state.json          steps, epochs, images seen, loss, elapsed seconds, args
    train_state.safetensors   raw weights + AdamW moments (for --resume only; not for git)

Usage::

    OMP_NUM_THREADS=1 python bench/ddpm_train.py --minutes 100            # fresh run
    OMP_NUM_THREADS=1 python bench/ddpm_train.py --minutes 30 --resume    # continue
    python bench/ddpm_train.py --bench-iters 5                            # throughput only
    python bench/ddpm_train.py --device cuda --batch-size 128 --minutes 5 # on a GPU
    python bench/ddpm_train.py --export bench/testbed/ddpm-fmnist         # ship the EMA weights

``--export DIR`` trains nothing: it turns the checkpoint in ``--out`` into the compact folder
that is committed to git (:func:`export_testbed`): the EMA U-Net in float16 safetensors
(~5 MB), its config, the scheduler config, ``train_state.json`` (steps, images seen,
seconds, the commands of every run; the optimizer state stays behind) and a ``SHA256SUMS``
that the loader (:mod:`bitpress.cache.testbed`) checks before it upcasts to float32.

The shipped testbed ``bench/testbed/ddpm-fmnist`` was trained on CPU (its
``train_state.json`` holds the commands); the earlier GPU-trained weights that
bench/RESULTS.md's older diffusion rows used were never committed and are gone.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from bitpress.cache.fid import load_fashion_mnist  # the one Fashion-MNIST loader (also used by FID)
from bitpress.formats.checkpoint import atomic_output_dir  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "ddpm-fmnist"


def build_unet(sample_size: int = 28):
    """The testbed U-Net (see module docstring for the reasoning behind the config)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    )


def build_scheduler():
    """DDPM scheduler: 1000 steps, linear betas 1e-4 .. 0.02 (the DDPM paper's)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, clip_sample=True)


def _opt_state_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """Flatten AdamW state into name -> tensor (safetensors-compatible, no pickle)."""
    out: dict[str, torch.Tensor] = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, p in zip(names, params):
        st = opt.state.get(p)
        if not st:
            continue
        out[f"opt.exp_avg.{name}"] = st["exp_avg"].contiguous()
        out[f"opt.exp_avg_sq.{name}"] = st["exp_avg_sq"].contiguous()
        out[f"opt.step.{name}"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    return out


def _load_opt_state(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, p in zip(names, params):
        key = f"opt.exp_avg.{name}"
        if key not in tensors:
            continue
        opt.state[p] = {
            "step": torch.tensor(float(tensors[f"opt.step.{name}"].item())),
            "exp_avg": tensors[key].clone(),
            "exp_avg_sq": tensors[f"opt.exp_avg_sq.{name}"].clone(),
        }


def save_checkpoint(out: Path, ema, model, opt, sched, state: dict) -> None:
    """Write the pipeline dir + training state atomically (temp dir in the same parent, rename)."""
    from diffusers import DDPMPipeline
    from safetensors.torch import save_file

    with atomic_output_dir(out, overwrite=True) as tmp:
        ema_cpu = copy.deepcopy(ema).cpu() if next(ema.parameters()).device.type != "cpu" else ema
        DDPMPipeline(unet=ema_cpu, scheduler=sched).save_pretrained(tmp, safe_serialization=True)
        names = [n for n, _ in model.named_parameters()]
        tensors = {f"model.{n}": p.detach().contiguous() for n, p in model.named_parameters()}
        tensors.update(_opt_state_tensors(opt, names))
        tensors = {k: v.cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp / "train_state.safetensors"))
        (tmp / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")


def export_testbed(src: Path, dst: Path, commands: list[str] | None = None) -> dict:
    """Write the compact, checksummed copy of the training checkpoint ``src`` to ``dst``.

    float16 EMA weights + configs + ``train_state.json`` (``commands`` added when the runs did
    not record theirs) + ``SHA256SUMS``; written to a temp folder beside ``dst``, then renamed.
    Returns the export record stored under ``train_state.json["export"]``.
    """
    from safetensors.torch import load_file, save_file

    from bitpress.cache.testbed import sha256_file, write_checksums

    wpath = src / "unet" / "diffusion_pytorch_model.safetensors"
    for f in (wpath, src / "unet" / "config.json", src / "scheduler" / "scheduler_config.json",
              src / "model_index.json", src / "train_state.json"):
        if not f.is_file():
            raise SystemExit(f"--export: {f} is missing; train first (--out {src})")
    w32 = load_file(str(wpath))
    bad = [k for k, v in w32.items() if not torch.isfinite(v).all() or v.abs().max() > 65504]
    if bad:
        raise SystemExit(f"--export: tensors not representable in float16: {bad[:5]}")
    w16 = {k: v.to(torch.float16).contiguous() for k, v in w32.items()}
    err = max(float((v.float() - w32[k]).abs().max()) for k, v in w16.items())
    state = json.loads((src / "train_state.json").read_text())
    runs = state.get("runs", [])
    if commands:
        state["commands"] = list(commands)
    elif all("command" in r for r in runs):
        state["commands"] = [r["command"] for r in runs]
    else:
        raise SystemExit("--export: the runs did not record their commands; pass them with --command")
    # what the fp16 rounding does to one U-Net evaluation (seeded input, mid-trajectory step)
    unet32 = build_unet()
    unet32.load_state_dict(w32)
    unet16 = build_unet()
    unet16.load_state_dict({k: v.float() for k, v in w16.items()})
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 28, 28, generator=g), torch.tensor([999, 500, 100, 10])
    with torch.no_grad():
        y32, y16 = unet32.eval()(x, t).sample, unet16.eval()(x, t).sample
    rel = float((y16 - y32).norm() / y32.norm())
    export = {"dtype": "float16", "source_sha256_fp32": sha256_file(wpath),
              "max_abs_rounding": err, "rel_output_change": rel,
              "params": sum(v.numel() for v in w32.values()),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    state["export"] = export
    with atomic_output_dir(dst, overwrite=True) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        save_file(w16, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(src / "unet" / "config.json", tmp / "unet" / "config.json")
        shutil.copyfile(src / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
        shutil.copyfile(src / "model_index.json", tmp / "model_index.json")
        (tmp / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
        files = [str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file()]
        write_checksums(tmp, files)
        for p in tmp.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return export


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=100.0, help="wall-clock budget of this run")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps")
    ap.add_argument("--ema-decay", type=float, default=0.998)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=float, default=10.0, help="minutes between checkpoints")
    ap.add_argument("--log-every", type=float, default=60.0, help="seconds between log lines")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 1)")
    ap.add_argument("--bench-iters", type=int, default=0, help="only time this many steps and exit")
    ap.add_argument("--device", default="cpu",
                    help="torch device to train on (cpu, cuda); the data order and noise are drawn "
                         "on CPU, so a run is the same sequence on any device up to rounding")
    ap.add_argument("--data", type=Path, default=None,
                    help="folder with train-images-idx3-ubyte.gz (default: the Debian package's)")
    ap.add_argument("--export", type=Path, default=None, metavar="DIR",
                    help="train nothing: write --out's EMA weights as the compact, checksummed "
                         "float16 folder DIR (e.g. bench/testbed/ddpm-fmnist)")
    ap.add_argument("--command", action="append", default=None,
                    help="with --export: the training command(s) to record, for runs that did not "
                         "record their own (repeat for each run)")
    args = ap.parse_args(argv)
    if args.export is not None:
        rec = export_testbed(args.out, args.export, args.command)
        print(json.dumps(rec), flush=True)
        return 0
    command = "OMP_NUM_THREADS={} python bench/ddpm_train.py {}".format(
        os.environ.get("OMP_NUM_THREADS", ""), " ".join(sys.argv[1:] if argv is None else argv))

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    t_start = time.time()

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device is visible to torch", file=sys.stderr)
        return 2
    data = load_fashion_mnist("train", *([args.data] if args.data else [])).to(dev)
    n = data.shape[0]
    torch.manual_seed(args.seed)
    model = build_unet().to(dev)
    sched = build_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in model.parameters())

    state = {"step": 0, "images": 0, "epoch": 0, "pos": 0, "elapsed_s": 0.0,
             "loss_ema": None, "params": n_params, "batch_size": args.batch_size,
             "lr": args.lr, "ema_decay": args.ema_decay, "seed": args.seed, "threads": threads,
             "runs": []}
    ema = build_unet().to(dev)
    if args.resume:
        from safetensors.torch import load_file

        st_path = args.out / "train_state.safetensors"
        if not st_path.exists():
            print(f"--resume: no checkpoint at {args.out}", file=sys.stderr)
            return 2
        prev = json.loads((args.out / "train_state.json").read_text())
        if prev["batch_size"] != args.batch_size or prev["seed"] != args.seed:
            print("--resume: batch size / seed differ from the checkpoint's", file=sys.stderr)
            return 2
        state.update(prev)
        state.update(lr=args.lr, ema_decay=args.ema_decay, threads=threads)  # this run's settings
        tensors = {k: v.to(dev) for k, v in load_file(str(st_path)).items()}
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _load_opt_state(opt, [nm for nm, _ in model.named_parameters()], tensors)
        from safetensors.torch import load_file as lf
        ema.load_state_dict(lf(str(args.out / "unet" / "diffusion_pytorch_model.safetensors")))
        print(f"resumed at step {state['step']} (epoch {state['epoch']}, pos {state['pos']})", flush=True)
    else:
        ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    ema.eval()
    model.train()
    print(f"params {n_params / 1e6:.3f} M, batch {args.batch_size}, threads {threads}, "
          f"budget {args.minutes:.1f} min", flush=True)

    alphas_cumprod = sched.alphas_cumprod.float().to(dev)
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())
    budget = args.minutes * 60.0
    last_ckpt = last_log = time.time()
    run_t0 = time.time()
    run_step0, run_img0 = state["step"], state["images"]
    elapsed0 = state["elapsed_s"]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + state["epoch"]))
    loss_sum, loss_n, loss_acc, loss_cnt = 0.0, 0, None, 0
    timed = 0
    while True:
        now = time.time()
        if args.bench_iters and timed >= args.bench_iters + 1:
            break
        if not args.bench_iters and now - t_start >= budget:
            break
        if state["pos"] + args.batch_size > n:  # next epoch, drop the ragged tail
            state["epoch"] += 1
            state["pos"] = 0
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + state["epoch"]))
        idx = perm[state["pos"]:state["pos"] + args.batch_size]
        x0 = data[idx.to(dev)]
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + state["step"])
        noise = torch.randn(x0.shape, generator=g).to(dev, non_blocking=True)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=g).to(dev)
        ac = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        lr = args.lr * min(1.0, (state["step"] + 1) / max(1, args.warmup))
        for gr in opt.param_groups:
            gr["lr"] = lr
        if args.bench_iters and timed == 1:
            bench_t0 = time.time()
        loss = torch.nn.functional.mse_loss(model(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        timed += 1
        state["step"] += 1
        state["pos"] += args.batch_size
        state["images"] += args.batch_size
        # EMA with the usual warm-up so early checkpoints are not dominated by the init.
        d = min(args.ema_decay, (1 + state["step"]) / (10 + state["step"]))
        with torch.no_grad():
            torch._foreach_mul_(ema_params, d)
            torch._foreach_add_(ema_params, model_params, alpha=1 - d)
        loss_acc = loss.detach() if loss_acc is None else loss_acc + loss.detach()
        loss_cnt += 1
        if loss_cnt >= 50 or dev.type == "cpu":  # fold in the batch means (one sync per 50 steps)
            lv = float(loss_acc) / loss_cnt
            loss_sum += lv * loss_cnt
            loss_n += loss_cnt
            state["loss_ema"] = lv if state["loss_ema"] is None else \
                (1 - 0.01 * loss_cnt) * state["loss_ema"] + 0.01 * loss_cnt * lv
            loss_acc, loss_cnt = None, 0
        now = time.time()
        if now - last_log >= args.log_every and loss_n:
            ips = (state["images"] - run_img0) / (now - run_t0)
            print(f"step {state['step']} epoch {state['epoch']} img {state['images']} "
                  f"loss {loss_sum / loss_n:.4f} (ema {state['loss_ema']:.4f}) lr {lr:.2e} "
                  f"{ips:.1f} img/s elapsed {(now - t_start) / 60:.1f} min", flush=True)
            loss_sum, loss_n = 0.0, 0
            last_log = now
        if not args.bench_iters and now - last_ckpt >= args.ckpt_every * 60:
            state["elapsed_s"] = elapsed0 + now - run_t0
            save_checkpoint(args.out, ema, model, opt, sched, state)
            print(f"checkpoint at step {state['step']} -> {args.out}", flush=True)
            last_ckpt = time.time()

    if dev.type == "cuda":
        torch.cuda.synchronize()
    if args.bench_iters:
        dt = time.time() - bench_t0
        print(f"bench: {args.bench_iters} steps of batch {args.batch_size}: "
              f"{args.bench_iters * args.batch_size / dt:.1f} img/s ({dt / args.bench_iters:.3f} s/step)")
        return 0
    now = time.time()
    state["elapsed_s"] = elapsed0 + now - run_t0
    state["runs"] = list(state.get("runs", [])) + [{
        "steps": state["step"] - run_step0, "seconds": round(now - run_t0, 1),
        "images_per_s": round((state["images"] - run_img0) / max(1e-9, now - run_t0), 2),
        "command": command,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev)}]
    state["epochs_seen"] = round(state["images"] / n, 3)
    save_checkpoint(args.out, ema, model, opt, sched, state)
    loss_txt = "n/a" if state["loss_ema"] is None else f"{state['loss_ema']:.4f}"
    print(f"done: step {state['step']} images {state['images']} ({state['epochs_seen']} epochs) "
          f"loss_ema {loss_txt} -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
