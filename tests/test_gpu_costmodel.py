"""bench/gpu_costmodel.py: the byte counts behind the predicted GPU times (pure Python)."""
from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_costmodel", ROOT / "bench" / "gpu_costmodel.py")
cm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cm)


def test_bytes_and_predictions():
    n, k = 4096, 4096
    b = {kern: cm.weight_bytes(kern, n, k) for kern in cm.KERNELS}
    assert b["fp16"] == n * k * 2
    # codes at exactly b bits + fp16 (s, z) per 16-row tile and group
    assert b["mma_w4g128"] == n * k / 2 + n * (k // 128) * 4
    assert b["mma_w2g64"] < b["mma_w3g128"] < b["mma_w4g128"] < b["fp16"]
    assert b["mma_w4g128_s50"] < 0.6 * b["mma_w4g128"]
    assert cm.spec("mma_w4g128_s50") == (4, 128) and cm.spec("tinygemm_w4g128") == (4, 128)
    dev = cm.DEVICES["h100"]
    for kern in cm.KERNELS[1:]:
        fp = cm.predict("fp16", n, k, 1, dev, 0.8, 2.0)["predicted_us"]
        r = cm.predict(kern, n, k, 1, dev, 0.8, 2.0)
        assert r["predicted_us"] < fp and r["t_mem_us"] > 0
    # the W2 kernel at 64 rows becomes issue-bound in the model, not memory-bound
    r = cm.predict("mma_w2g64", n, k, 64, dev, 0.8, 2.0)
    assert r["t_issue_us"] > r["t_mem_us"]
