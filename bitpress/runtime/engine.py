"""The CPU decode engine: whole decode steps in C++ (``csrc/cpu/engine.cpp``) over the packed
weights' kernels, for the decoder families the pipeline knows.

A Hugging Face ``generate`` step of SmolLM2-135M spends most of its time outside the linears
(Python, rotary, cache concatenation, small ops: bench/RESULTS.md "Decode"). The engine
binds every weight of the model once (repacked packed weights from the kernels' cache; fp32,
fp16 or bf16 float weights; norms; rotary tables computed by the model's own rotary module)
and runs a decode step as one C++ call with no Python per layer: norms, rotary, a static KV
cache, attention, the MLP, the head and greedy argmax.

Prefill runs through the model's own Hugging Face forward over the same modules (the GEMM path
for long prompts); its KV cache is copied into the engine's static cache. Families: ``llama``
(SmolLM, Mistral-style without sliding window), ``qwen2``, ``qwen3``, ``gemma3`` / ``gemma3_text``
and ``gpt2``. :func:`engine_support` says whether a model can run on it and why not.

Kernel modes: the packed linears run in one activation mode (:data:`bitpress.kernels.cpu`
``exact`` by default: what the reference op computes, at fp32 accuracy — for dense weights
integer dot products with three int8 planes of x — or the opt-in ``int8`` / ``lut``). ``DecodeEngine.mode`` names it; ``bitpress eval --kernel-mode``
scores the same kernels.
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

_FAMILIES = {"llama": "llama", "mistral": "llama", "smollm3": None, "qwen2": "qwen2",
             "qwen3": "qwen3", "gemma3": "gemma3", "gemma3_text": "gemma3", "gpt2": "gpt2"}
_L_DENSE, _L_SPARSE, _L_F32, _L_HALF = 1, 2, 3, 4
_N_RMS, _N_RMS1P, _N_LAYER = 0, 1, 2
_A_SILU, _A_GELU_TANH = 0, 1


class EngineUnsupported(ConfigError):
    """The model (or one of its modules) cannot run on the decode engine."""


def _native():
    from ..kernels import native

    native.require_if_asked("the decode engine")
    mod = native._module()
    if mod is None or not hasattr(mod, "DecodeEngine"):
        raise EngineUnsupported("bitpress._C with the decode engine is not built (no C++ "
                                "compiler at install time?)")
    return mod


def _text_config(model: nn.Module):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def _family(model: nn.Module) -> str:
    mt = getattr(_text_config(model), "model_type", None)
    fam = _FAMILIES.get(mt)
    if fam is None:
        raise EngineUnsupported(f"model type {mt!r} has no decode-engine support (supported: "
                                f"{', '.join(sorted(k for k, v in _FAMILIES.items() if v))})")
    return fam


class _Binder:
    """Builds the C++ descriptions of linears and keeps every tensor they point to alive."""

    def __init__(self, mode: str) -> None:
        from ..kernels import cpu as kcpu

        self.kcpu = kcpu
        self.mode = mode
        self.keep: list[Any] = []
        self.bytes = 0

    def tensor(self, t: Optional[torch.Tensor], what: str) -> int:
        if t is None:
            return 0
        if t.device.type != "cpu":
            raise EngineUnsupported(f"{what} is on {t.device}; the engine runs on CPU")
        t = t.detach().float().contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def linear(self, mod: nn.Module, name: str, transpose: bool = False) -> dict[str, Any]:
        from ..nn.modules import GroupSparseLinear, HalfLinear, QuantLinear

        kc = self.kcpu
        # (a member of a bitpress.nn.fuse group keeps its own buffers: bound as it is)
        bias = getattr(mod, "bias", None)
        d: dict[str, Any] = {}
        if isinstance(mod, QuantLinear):
            x = torch.empty(1, mod.in_features)
            args = (x, mod.qweight, mod.scales, mod.zeros, None, mod.bits, mod.gs,
                    mod.in_features)
            if isinstance(mod.scales, nn.Parameter) or not kc.dense_supports(*args):
                raise EngineUnsupported(f"{name}: {mod.bits}-bit g{mod.group_size} has no CPU "
                                        f"kernel (bits 2/3/4, groups of 16..256 or per-channel)")
            code = kc._MODES[self.mode]
            if code >= 2 and (mod.bits != 2 or kc.get_isa() == "scalar"):
                code = 1
            buf, pk = kc._dense_packed(mod.qweight, mod.scales, mod.zeros, mod.bits, mod.gs,
                                       mod.in_features, 1 if code >= 2 else 0)
            self.keep.append(buf)
            self.bytes += buf.numel()
            d = dict(kind=_L_DENSE, w=buf.data_ptr(), out=mod.out_features, **{"in":
                     mod.in_features}, bits=mod.bits, gs=mod.gs, pkind=pk, mode=code)
        elif isinstance(mod, GroupSparseLinear):
            x = torch.empty(1, mod.in_features)
            args = (x, mod.row_ptr, mod.col_idx, mod.qvalues, mod.scales, mod.zeros, None,
                    mod.bits, mod.group_size, mod.in_features)
            if isinstance(mod.scales, nn.Parameter) or not kc.sparse_supports(*args):
                raise EngineUnsupported(f"{name}: group-sparse {mod.bits}-bit g{mod.group_size} "
                                        f"has no CPU kernel")
            packed, nnz, pk = kc._sparse_packed(mod.row_ptr, mod.col_idx, mod.qvalues,
                                                mod.scales, mod.zeros, mod.bits,
                                                mod.group_size, mod.in_features)
            self.keep.append(packed)
            self.bytes += packed.numel()
            d = dict(kind=_L_SPARSE, w=packed.data_ptr(), nnz=nnz, out=mod.out_features,
                     **{"in": mod.in_features}, bits=mod.bits, gs=mod.group_size, pkind=pk,
                     mode=min(kc._MODES[self.mode], 1))
        elif isinstance(mod, HalfLinear):
            w = mod.weight.detach().contiguous()
            self.keep.append(w)
            self.bytes += w.numel() * 2
            d = dict(kind=_L_HALF, w=w.data_ptr(), out=w.shape[0], **{"in": w.shape[1]},
                     bf16=int(w.dtype == torch.bfloat16))
        elif isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
            w = mod.weight.detach()
            if type(mod).__name__ == "Conv1D" or transpose:
                w = w.t()
            if w.dtype in (torch.float16, torch.bfloat16):
                w = w.contiguous()
                self.bytes += w.numel() * 2
                d = dict(kind=_L_HALF, w=w.data_ptr(), out=w.shape[0], **{"in": w.shape[1]},
                         bf16=int(w.dtype == torch.bfloat16))
            else:
                w = w.float().contiguous()
                self.bytes += w.numel() * 4
                d = dict(kind=_L_F32, w=w.data_ptr(), out=w.shape[0], **{"in": w.shape[1]})
            self.keep.append(w)
        else:
            raise EngineUnsupported(f"{name}: module type {type(mod).__name__} is not a linear "
                                    f"the engine can bind")
        d["bias"] = self.tensor(bias, f"{name}.bias")
        return d


def _norm(b: _Binder, mod: nn.Module, key: str, name: str) -> dict[str, int]:
    if mod is None:
        return {}
    w = getattr(mod, "weight", None)
    if w is None:
        raise EngineUnsupported(f"{name}: a norm without a weight")
    out = {key: b.tensor(w, name)}
    bias = getattr(mod, "bias", None)
    if bias is not None:
        out[key + "_b"] = b.tensor(bias, name + ".bias")
    return out


def _eps(mod: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        v = getattr(mod, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    if isinstance(mod, nn.RMSNorm) and mod.eps is None:  # torch's default: finfo(dtype).eps
        return float(torch.finfo(mod.weight.dtype if mod.weight is not None else
                                 torch.float32).eps)
    raise EngineUnsupported(f"{type(mod).__name__}: cannot read its epsilon")


def _rope_tables(model: nn.Module, fam: str, max_len: int, head_dim: int
                 ) -> dict[Optional[str], tuple[torch.Tensor, torch.Tensor]]:
    """cos / sin ``[max_len, head_dim]`` from the model's own rotary module (per layer type
    for Gemma-3), so scaling variants come out exactly as Hugging Face computes them."""
    inner = model.model
    rot = inner.rotary_emb
    pos = torch.arange(max_len).unsqueeze(0)
    probe = torch.zeros(1, 1, head_dim)
    tables: dict[Optional[str], tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        if fam == "gemma3":
            for lt in sorted(set(_text_config(model).layer_types)):
                cos, sin = rot(probe, pos, lt)
                tables[lt] = (cos[0].float().contiguous(), sin[0].float().contiguous())
        else:
            cos, sin = rot(probe, pos)
            tables[None] = (cos[0].float().contiguous(), sin[0].float().contiguous())
    for c, s in tables.values():
        if c.shape != (max_len, head_dim):
            raise EngineUnsupported(f"rotary tables of shape {tuple(c.shape)}, expected "
                                    f"{(max_len, head_dim)} (partial rotary is not supported)")
    return tables


class DecodeEngine:
    """Decode steps of a Hugging Face causal LM in C++ (see the module docstring).

    ``DecodeEngine(model, max_len=2048, threads=None, mode=None)`` binds the model's weights
    (they must stay unchanged while the engine lives; call :meth:`rebind` after editing them).
    ``mode``: the packed kernels' activation mode (``exact``, ``int8``, ``lut``, ``lut63``;
    default :func:`bitpress.kernels.cpu.get_act_mode`)."""

    def __init__(self, model: nn.Module, max_len: int = 2048, threads: Optional[int] = None,
                 mode: Optional[str] = None) -> None:
        from ..kernels import cpu as kcpu

        self.model = model
        self.family = _family(model)
        self.max_len = int(max_len)
        self.threads = int(threads or torch.get_num_threads())
        self.mode = mode or kcpu.get_act_mode()
        if self.mode not in kcpu._MODES:
            raise ConfigError(f"kernel mode must be one of {sorted(kcpu._MODES)}, got "
                              f"{self.mode!r}")
        if self.max_len < 1:
            raise ConfigError("max_len must be positive")
        self._build()

    # ---- binding ---------------------------------------------------------------------
    def _build(self) -> None:  # noqa: C901 - one linear walk over the supported families
        m, fam = self.model, self.family
        cfg = _text_config(m)
        b = _Binder(self.mode)
        self._binder = b
        if fam == "gpt2":
            tr = m.transformer
            blocks, embed = tr.h, tr.wte
            hidden = cfg.n_embd
            n_heads = n_kv = cfg.n_head
            head_dim = hidden // n_heads
            inter = getattr(cfg, "n_inner", None) or 4 * hidden
            norm_kind, act, gated = _N_LAYER, _A_GELU_TANH, False
            eps = cfg.layer_norm_epsilon
            if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or \
                    getattr(cfg, "reorder_and_upcast_attn", False):
                raise EngineUnsupported("GPT-2 variants with per-layer attention scaling")
            attn_scale = 1.0 / math.sqrt(head_dim) if cfg.scale_attn_weights else 1.0
            final = tr.ln_f
            if self.max_len > cfg.n_positions:
                self.max_len = cfg.n_positions
        else:
            inner = m.model
            blocks, embed = inner.layers, inner.embed_tokens
            hidden = cfg.hidden_size
            n_heads = cfg.num_attention_heads
            n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
            head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
            inter = cfg.intermediate_size
            gated = True
            eps = _eps(blocks[0].input_layernorm)
            final = inner.norm
            if fam == "gemma3":
                norm_kind = _N_RMS1P
                act = _A_GELU_TANH
                attn_scale = cfg.query_pre_attn_scalar ** -0.5
                if getattr(cfg, "attn_logit_softcapping", None):
                    raise EngineUnsupported("attention logit soft-capping")
            else:
                norm_kind, attn_scale = _N_RMS, head_dim ** -0.5
                hact = getattr(cfg, "hidden_act", "silu")
                if hact not in ("silu", "swish"):
                    raise EngineUnsupported(f"MLP activation {hact!r}")
                act = _A_SILU
            if fam == "llama" and getattr(cfg, "sliding_window", None):
                raise EngineUnsupported("sliding-window attention outside Gemma-3")
            if fam == "qwen2" and getattr(cfg, "use_sliding_window", False):
                raise EngineUnsupported("Qwen2 sliding-window attention")
            if getattr(cfg, "mlp_bias", False):
                pass  # biases are bound with each linear
        gelu = getattr(cfg, "hidden_activation", None) or getattr(cfg, "activation_function", None)
        if fam in ("gemma3", "gpt2") and gelu not in ("gelu_pytorch_tanh", "gelu_new"):
            raise EngineUnsupported(f"activation {gelu!r} (the engine has gelu-tanh)")

        emb = embed.weight.detach()
        if emb.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise EngineUnsupported(f"embedding dtype {emb.dtype}")
        emb = emb.contiguous()
        b.keep.append(emb)
        embed_kind = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[emb.dtype]
        embed_scale = 1.0
        if fam == "gemma3":
            # Gemma3TextScaledWordEmbedding multiplies by sqrt(hidden) cast to the table's dtype
            embed_scale = float(torch.tensor(hidden ** 0.5, dtype=emb.dtype))
        tables = {} if fam == "gpt2" else _rope_tables(m, fam, self.max_len, head_dim)
        for c, s in tables.values():
            b.keep += [c, s]
        self.cache = torch.zeros(len(blocks), 2, n_kv, self.max_len, head_dim)
        layers = []
        for i, blk in enumerate(blocks):
            p = f"layers.{i}"
            d: dict[str, Any] = {}
            if fam == "gpt2":
                d.update(_norm(b, blk.ln_1, "attn_norm", p + ".ln_1"))
                d.update(_norm(b, blk.ln_2, "mlp_norm", p + ".ln_2"))
                d["qkv"] = b.linear(blk.attn.c_attn, p + ".attn.c_attn")
                d["o"] = b.linear(blk.attn.c_proj, p + ".attn.c_proj")
                d["up"] = b.linear(blk.mlp.c_fc, p + ".mlp.c_fc")
                d["down"] = b.linear(blk.mlp.c_proj, p + ".mlp.c_proj")
            else:
                att, mlp = blk.self_attn, blk.mlp
                d.update(_norm(b, blk.input_layernorm, "attn_norm", p + ".input_layernorm"))
                if fam == "gemma3":
                    d.update(_norm(b, blk.post_attention_layernorm, "post_attn_norm",
                                   p + ".post_attention_layernorm"))
                    d.update(_norm(b, blk.pre_feedforward_layernorm, "mlp_norm",
                                   p + ".pre_feedforward_layernorm"))
                    d.update(_norm(b, blk.post_feedforward_layernorm, "post_mlp_norm",
                                   p + ".post_feedforward_layernorm"))
                else:
                    d.update(_norm(b, blk.post_attention_layernorm, "mlp_norm",
                                   p + ".post_attention_layernorm"))
                if fam in ("gemma3", "qwen3"):
                    d.update(_norm(b, att.q_norm, "q_norm", p + ".self_attn.q_norm"))
                    d.update(_norm(b, att.k_norm, "k_norm", p + ".self_attn.k_norm"))
                for key, mod in (("q", att.q_proj), ("k", att.k_proj), ("v", att.v_proj),
                                 ("o", att.o_proj), ("gate", mlp.gate_proj),
                                 ("up", mlp.up_proj), ("down", mlp.down_proj)):
                    d[key] = b.linear(mod, f"{p}.{key}")
                lt = None
                if fam == "gemma3":
                    lt = cfg.layer_types[i]
                    if lt == "sliding_attention":
                        d["window"] = int(cfg.sliding_window)
                cos, sin = tables[lt]
                d["cos"], d["sin"] = cos.data_ptr(), sin.data_ptr()
            d["k_cache"] = self.cache[i, 0].data_ptr()
            d["v_cache"] = self.cache[i, 1].data_ptr()
            layers.append(d)
        head = m.get_output_embeddings()
        top = {"embed": emb.data_ptr(), "head": b.linear(head, "lm_head")}
        top.update(_norm(b, final, "final_norm", "final_norm"))
        if fam == "gpt2":
            top["wpe"] = b.tensor(m.transformer.wpe.weight, "wpe")
        softcap = getattr(cfg, "final_logit_softcapping", None) or 0.0
        config = dict(n_layers=len(blocks), hidden=hidden, n_heads=n_heads, n_kv=n_kv,
                      head_dim=head_dim, intermediate=inter, vocab=top["head"]["out"],
                      max_len=self.max_len, norm=norm_kind, eps=float(eps), act=act,
                      gated=gated, attn_scale=float(attn_scale), embed_scale=embed_scale,
                      final_softcap=float(softcap), embed_kind=embed_kind, threads=self.threads)
        self.vocab = config["vocab"]
        self.n_kv, self.head_dim, self.n_layers = n_kv, head_dim, len(blocks)
        self._engine = _native().DecodeEngine(config, layers, top)
        self.weight_bytes = b.bytes
        self.logits = torch.empty(self.vocab)

    def rebind(self) -> None:
        """Bind the model's weights again (after they were changed in place)."""
        self._build()

    # ---- running ---------------------------------------------------------------------
    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits ``[vocab]`` (fp32) of one token at position ``pos``; the KV cache must hold
        positions ``0 .. pos - 1``. The returned tensor is reused by the next call."""
        self._engine.step(int(token), int(pos), self.logits.data_ptr())
        return self.logits

    def load_cache(self, past_key_values: Any, length: int) -> None:
        """Copy a Hugging Face cache (after a prefill of ``length`` tokens) into the static
        cache. Layers that keep only their last positions (sliding windows) are placed at the
        end of the prefix."""
        layers = getattr(past_key_values, "layers", None)
        if layers is not None:
            kv = [(lay.keys, lay.values) for lay in layers]
        elif hasattr(past_key_values, "key_cache"):
            kv = list(zip(past_key_values.key_cache, past_key_values.value_cache))
        else:
            kv = [(k, v) for k, v in past_key_values]
        if len(kv) != self.n_layers:
            raise RuntimeError(f"cache has {len(kv)} layers, the model {self.n_layers}")
        if length > self.max_len:
            raise ConfigError(f"prompt of {length} tokens exceeds the engine's max_len "
                              f"{self.max_len}")
        for i, (k, v) in enumerate(kv):
            t = k.shape[-2]
            if t > length:
                raise RuntimeError(f"layer {i}: cache holds {t} positions, prompt {length}")
            self.cache[i, 0, :, length - t:length] = k[0].float()
            self.cache[i, 1, :, length - t:length] = v[0].float()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``[1, T]`` through the Hugging Face forward over the same modules,
        fill the engine's cache; returns the last position's logits ``[vocab]``."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ConfigError("the decode engine runs one sequence (batch 1)")
        kw = {}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            kw["logits_to_keep"] = 1  # the head runs on the last position only
        out = self.model(input_ids=input_ids, use_cache=True, **kw)
        cache = out.past_key_values
        self.load_cache(cache, input_ids.shape[1])
        return out.logits[0, -1].float()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: Optional[int | list[int]] = None,
                 sample: Optional[Callable[[torch.Tensor], int]] = None,
                 timings: Optional[dict] = None) -> torch.Tensor:
        """Greedy (or ``sample(logits) -> id``) generation; returns ``[1, T + new]`` ids. Stops
        at an EOS id. ``timings`` (a dict) receives prefill / decode seconds and counts."""
        import time

        t0 = time.perf_counter()
        T = input_ids.shape[1]
        if T + max_new_tokens > self.max_len:
            raise ConfigError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"engine's max_len {self.max_len}")
        logits = self.prefill(input_ids)
        first = int(torch.argmax(logits)) if sample is None else int(sample(logits))
        t1 = time.perf_counter()
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        ids = [first]
        n_rest = max_new_tokens - 1
        if n_rest > 0 and first not in eos:
            if sample is None and not eos:
                out = torch.empty(n_rest, dtype=torch.int64)
                self._engine.greedy(first, T, n_rest, out.data_ptr(), self.logits.data_ptr())
                ids += out.tolist()
            else:
                tok, pos = first, T
                for _ in range(n_rest):
                    lg = self.step(tok, pos)
                    tok = int(torch.argmax(lg)) if sample is None else int(sample(lg))
                    ids.append(tok)
                    pos += 1
                    if tok in eos:
                        break
        t2 = time.perf_counter()
        if timings is not None:
            timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, prompt_tokens=T,
                           new_tokens=len(ids), decode_steps=len(ids) - 1)
        return torch.cat([input_ids, torch.tensor([ids], dtype=input_ids.dtype)], dim=1)


def engine_support(model: nn.Module) -> Optional[str]:
    """``None`` when :class:`DecodeEngine` can run ``model``, else the reason it cannot."""
    try:
        _native()
        _family(model)
    except EngineUnsupported as e:
        return str(e)
    dev = next(model.parameters(), None)
    if dev is not None and dev.device.type != "cpu":
        return f"model on {dev.device}; the engine runs on CPU"
    return None


# ---- generate() through the engine ------------------------------------------------------------
_HF_ONLY = ("num_beams", "streamer", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
            "num_return_sequences", "output_scores", "return_dict_in_generate", "output_logits",
            "repetition_penalty", "min_new_tokens", "min_length", "max_length", "past_key_values",
            "inputs_embeds", "assistant_model", "bad_words_ids", "no_repeat_ngram_size")


def make_sampler(temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None) -> Callable[[torch.Tensor], int]:
    """``sample(logits) -> id``: temperature, then top-k, then top-p (nucleus) filtering, as
    Hugging Face's sampling warpers apply them."""
    if temperature <= 0:
        raise ConfigError("temperature must be positive")

    def sample(logits: torch.Tensor) -> int:
        lg = logits.float() / temperature
        if top_k:
            kth = torch.topk(lg, min(int(top_k), lg.numel())).values[-1]
            lg = lg.masked_fill(lg < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            srt, idx = torch.sort(lg, descending=True)
            cum = torch.softmax(srt, -1).cumsum(-1)
            drop = cum > top_p
            drop[1:] = drop[:-1].clone()
            drop[0] = False
            lg = lg.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
        return int(torch.multinomial(torch.softmax(lg, -1), 1, generator=generator))

    return sample


def _weights_signature(model: nn.Module) -> tuple:
    sig = []
    for t in list(model.parameters()) + list(model.buffers()):
        sig.append((t.data_ptr(), 0 if t.is_inference() else t._version))
    return tuple(sig)


def engine_for(model: nn.Module, length: int, mode: Optional[str] = None,
               threads: Optional[int] = None) -> DecodeEngine:
    """The model's cached :class:`DecodeEngine` with room for ``length`` positions, built
    again when the weights, the mode, the threads or the needed length changed."""
    from ..kernels import cpu as kcpu

    mode = mode or kcpu.get_act_mode()
    threads = int(threads or torch.get_num_threads())
    sig = _weights_signature(model)
    eng = model.__dict__.get("_bitpress_engine")
    if eng is None or eng.max_len < length or eng.mode != mode or eng.threads != threads \
            or model.__dict__.get("_bitpress_engine_sig") != sig:
        max_len = max(length, 256)
        ctx = getattr(_text_config(model), "max_position_embeddings", None)
        if ctx:
            max_len = min(max(length, min(2 * length, 4096)), max(ctx, length))
        eng = DecodeEngine(model, max_len=max_len, threads=threads, mode=mode)
        model.__dict__["_bitpress_engine"] = eng
        model.__dict__["_bitpress_engine_sig"] = sig
    return eng


def _engine_reason(model: nn.Module, input_ids: Optional[torch.Tensor], kw: dict) -> Optional[str]:
    why = engine_support(model)
    if why:
        return why
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        return "the engine decodes one sequence (batch 1, input_ids given)"
    am = kw.get("attention_mask")
    if am is not None and not bool(am.all()):
        return "padded attention mask"
    for k in _HF_ONLY:
        v = kw.get(k)
        if v not in (None, False, 1) or (k == "num_beams" and v not in (None, 1)):
            return f"generate option {k!r}"
    return None


def attach_generate(model: nn.Module) -> nn.Module:
    """Make ``model.generate`` run on the decode engine when it applies (CPU, batch 1, greedy
    or sampling with temperature / top-k / top-p) and on Hugging Face's ``generate``
    otherwise; ``model.bitpress_decode_path`` says which the last call used and why."""
    if "_bitpress_hf_generate" in model.__dict__:
        return model
    hf_generate = model.generate
    model.__dict__["_bitpress_hf_generate"] = hf_generate

    def generate(input_ids: Optional[torch.Tensor] = None, **kw):
        why = _engine_reason(model, input_ids, kw)
        if why is None:
            gc = getattr(model, "generation_config", None)
            new = kw.get("max_new_tokens") or getattr(gc, "max_new_tokens", None) or 20
            do_sample = kw.get("do_sample", getattr(gc, "do_sample", False))
            eos = kw.get("eos_token_id", getattr(gc, "eos_token_id", None))
            sampler = None
            if do_sample:
                sampler = make_sampler(kw.get("temperature", getattr(gc, "temperature", 1.0)) or 1.0,
                                       kw.get("top_k", getattr(gc, "top_k", None)),
                                       kw.get("top_p", getattr(gc, "top_p", None)))
            eng = engine_for(model, input_ids.shape[1] + int(new))
            model.bitpress_decode_path = f"bitpress engine (C++, kernel mode {eng.mode})"
            log.info("generate: %s", model.bitpress_decode_path)
            return eng.generate(input_ids, int(new), eos_token_id=eos, sample=sampler)
        model.bitpress_decode_path = f"transformers generate ({why})"
        log.info("generate: %s", model.bitpress_decode_path)
        return hf_generate(input_ids, **kw) if input_ids is not None else hf_generate(**kw)

    model.generate = generate
    return model
