"""Shared fixtures: tiny randomly initialised causal LMs saved as real HF directories
(safetensors + a real trained tokenizer), so checkpoint tests exercise the same code path
as a downloaded model without any network access."""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's interpreter, which is decided when triton
# is first imported — and other test modules import it indirectly (diffusers does), so it
# is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*pure-torch reference.*")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Packed weights are read at memory speed. "
    "A group of weights shares one scale and one zero point; the codes are small integers. "
) * 40


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def tiny_config(arch: str = "llama"):
    from transformers import AutoConfig

    if arch == "llama":
        return AutoConfig.for_model("llama", vocab_size=512, hidden_size=96,
                                    intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, tie_word_embeddings=True)
    if arch == "qwen2":
        return AutoConfig.for_model("qwen2", vocab_size=512, hidden_size=96, intermediate_size=160,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=256,
                                    tie_word_embeddings=False)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=512, n_embd=96, n_layer=2, n_head=4,
                                    n_positions=256)
    raise ValueError(arch)


def build_tiny(tmp_path_factory, arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    d = tmp_path_factory.mktemp(f"tiny-{arch}")
    model.save_pretrained(d, safe_serialization=True)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory, "qwen2")


def tiny_unet(seed: int = 0, skip: bool = False, layers: int = 1):
    """A random three-level diffusers ``UNet2DModel`` on 16 x 16 images with attention at the
    lowest level; ``skip``: score-sde style skip-sample blocks (the output of an up block is
    a tuple; they hard-code RGB and 32 groups)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    if skip:
        down = ("SkipDownBlock2D", "SkipDownBlock2D", "AttnSkipDownBlock2D")
        up = ("AttnSkipUpBlock2D", "SkipUpBlock2D", "SkipUpBlock2D")
    else:
        down = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
        up = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    ch, io = ((32, 32, 32), 3) if skip else ((8, 16, 16), 1)
    m = UNet2DModel(sample_size=16, in_channels=io, out_channels=io, block_out_channels=ch,
                    layers_per_block=layers, down_block_types=down, up_block_types=up,
                    norm_num_groups=4, attention_head_dim=8)
    return m.eval()


def tiny_plain_unet(sample_size: int = 8, seed: int = 0):
    """A random two-level diffusers ``UNet2DModel`` (one channel, widths 8 and 16, no
    attention): the smallest U-Net the cache passes run on."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1,
                       block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def tiny_cond_unet(seed: int = 0):
    """A random text-conditioned diffusers ``UNet2DConditionModel`` (8 x 8 latents of 4
    channels, cross-attention over 12-wide encoder states)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                             norm_num_groups=4, attention_head_dim=4)
    return m.eval()


def dir_digest(d) -> str:
    """SHA-256 over the names and bytes of every file below ``d`` (sorted): equal before and
    after a command means the command left the directory as it was."""
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` in the block, the previous one after it."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine the thread pool's
    synchronisation makes each forward many times slower: modules that use this run
    single-threaded (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    with torch_threads(1):
        yield


@pytest.fixture
def one_thread_per_test():
    """``one_thread`` for modules whose tests raise the thread count on purpose (the CPU
    kernels' thread sweeps): every test starts single-threaded, whatever the one before
    it set (``pytestmark = pytest.mark.usefixtures("one_thread_per_test")``)."""
    with torch_threads(1):
        yield


@pytest.fixture
def calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(TEXT)
    return p
