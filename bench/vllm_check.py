"""Load a ``bitpress export --format compressed-tensors`` directory in vLLM and compare its
greedy continuation and prompt log-probabilities with transformers' loading of the same
directory (dequantize=True). Needs a GPU machine with vLLM installed (not installable here:
vLLM's wheels replace the CPU torch this project pins).

    python bench/vllm_check.py OUT_CT_DIR [--prompt TEXT] [--json RESULT.json]

Prints a table and writes JSON (vLLM version, device, max |Δ logprob| over the prompt tokens,
whether the greedy continuations agree).
"""
from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig
    from vllm import LLM, SamplingParams

    llm = LLM(model=a.dir, dtype="float16", enforce_eager=True, max_model_len=512)
    cfg = llm.llm_engine.model_config
    assert cfg.quantization == "compressed-tensors", cfg.quantization
    sp = SamplingParams(temperature=0, max_tokens=a.tokens, prompt_logprobs=0)
    out = llm.generate([a.prompt], sp)[0]
    v_text = out.outputs[0].text
    v_lp = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]

    tok = AutoTokenizer.from_pretrained(a.dir)
    hf = AutoModelForCausalLM.from_pretrained(
        a.dir, quantization_config=CompressedTensorsConfig(dequantize=True),
        dtype=torch.float16).to("cuda")
    ids = tok(a.prompt, return_tensors="pt").input_ids.to("cuda")
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
    h_lp = lp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].tolist()
    gen = hf.generate(ids, max_new_tokens=a.tokens, do_sample=False)
    h_text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    res = {"vllm": vllm.__version__, "device": torch.cuda.get_device_name(),
           "max_abs_prompt_logprob_diff": max(abs(x - y) for x, y in zip(v_lp, h_lp)),
           "same_greedy_text": v_text == h_text, "vllm_text": v_text, "hf_text": h_text}
    for k, v in res.items():
        print(f"{k:32s} {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["max_abs_prompt_logprob_diff"] < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
