"""Write a synthetic sharded safetensors checkpoint with a real architecture's shapes.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/synth_ckpt.py SYNTH/llama2-13b-synth
    python bench/synth_ckpt.py OUT --layers 2 --hidden 256 --intermediate 688 ...  # smaller

Default: Llama-2-13B (40 blocks, hidden 5120, MLP 13824, 40 heads, vocab 32000), fp16,
about 26.0 GB, random weights with a decaying low-rank spectrum + noise and outlier input
channels (see bitpress.pipeline.synth). One tensor is held at a time.
"""
import argparse
import json
import os
import sys

# bench/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from bitpress.pipeline.synth import LLAMA2_13B, write_synthetic  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = dict(LLAMA2_13B)
    for k, v in (("num_hidden_layers", a.layers), ("hidden_size", a.hidden),
                 ("intermediate_size", a.intermediate), ("vocab_size", a.vocab)):
        if v is not None:
            cfg[k] = v
    if a.heads is not None:
        cfg["num_attention_heads"] = cfg["num_key_value_heads"] = a.heads
    print(json.dumps(write_synthetic(a.out, cfg, seed=a.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
