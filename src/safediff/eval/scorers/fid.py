"""Frechet Inception Distance against a user-given reference folder, implementation named.

FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between Gaussians fitted (mean,
unbiased covariance) to the features of generated and reference images. The trace of the matrix
square root is computed in float64 with the eigenvalue method: S_1 S_2 is similar to the
symmetric PSD matrix A = S_1^(1/2) S_2 S_1^(1/2), so Tr((S_1 S_2)^(1/2)) = sum_i sqrt(lambda_i(A)).
That equals scipy.linalg.sqrtm's trace (pytorch-fid's route) without its complex round-off and
its eps retry on near-singular products (small-sample covariances are singular).

Feature extractors:
- `load_pytorch_fid_inception(weights)`: pytorch-fid's InceptionV3 (the TF-ported FID network,
  2048-d pool features, bilinear resize to 299, inputs scaled to [-1, 1]) with its weights read
  from a local file (pt_inception-2015-12-05-6726825d.pth); nothing is downloaded. Protocol
  'fid/pytorch-fid-inception-v3'. Numbers are comparable with `python -m pytorch_fid` on the
  same folders (images are read with PIL as RGB / 255, as pytorch-fid does).
- any callable / nn.Module mapping images [B, 3, H, W] in [0, 1] to features [B, F] (or
  [B, F, 1, 1]); protocol 'fid/<implementation>' with the name the caller gives
  ('custom-features' by default). Tests use a tiny random module.

FID is a set metric: `score_images` appends each batch's features to the scorer (`features`,
reset with `reset()`) and returns per-image records that index them; `aggregate(records)` fits
the Gaussian to the rows those records name. The reference statistics come from a folder of
images (non-recursive, .png/.jpg/.jpeg/.webp/.bmp, sorted) or from a pytorch-fid .npz file (keys
mu, sigma), computed once per scorer.
"""

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn

from safediff.errors import SafediffError
from safediff.eval.scorers.base import (
    IMAGE_SUFFIXES,
    ImagesIn,
    as_image_list,
    load_image,
    make_aggregate,
    run_by_size,
)
from safediff.eval.stats import Estimate

PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_IMPLEMENTATION = "pytorch-fid-inception-v3"

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [N, F] -> (mean [F], unbiased covariance [F, F]), float64. Needs N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise SafediffError(
            f"FID needs at least 2 feature vectors [N, F], got shape {tuple(x.shape)}"
        )
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S_1 S_2)^(1/2)) for symmetric PSD S_1, S_2 [F, F], via eigenvalues of
    S_1^(1/2) S_2 S_1^(1/2)."""
    r = _sqrt_psd(np.asarray(sigma1, np.float64))
    a = r @ np.asarray(sigma2, np.float64) @ r
    lam = np.linalg.eigvalsh((a + a.T) / 2)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64.

    mu [F], sigma [F, F] symmetric PSD. ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise SafediffError(
            f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
            f"{s2.shape} (were both computed with the same feature extractor?)"
        )
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return float(max(value, 0.0))


def frechet_distance_of_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to features a [N_a, F] and b [N_b, F]
    (unbiased covariances, as `feature_statistics`); equal to
    `frechet_distance(*feature_statistics(a), *feature_statistics(b))`.

    With fewer samples than features (a bootstrap over a few hundred prompts in a 384-d space)
    it never forms an F x F matrix: for centred A, B, S_a = A^T A / (N_a - 1) and likewise S_b,
    the non-zero eigenvalues of S_a S_b are those of M M^T with M = A B^T / sqrt((N_a - 1)
    (N_b - 1)), so Tr((S_a S_b)^(1/2)) is the sum of M's singular values (an N_a x N_b SVD
    instead of two F x F eigendecompositions). Otherwise it takes the statistics route.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise SafediffError(
            f"FID needs two feature sets [N >= 2, F] of one width, got {a.shape} and {b.shape}"
        )
    if max(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    na, nb = len(a) - 1, len(b) - 1
    diff = mu_a - mu_b
    tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    value = diff @ diff + (ca * ca).sum() / na + (cb * cb).sum() / nb - 2.0 * tr_sqrt
    return float(max(value, 0.0))


class _PytorchFidFeatures(nn.Module):
    """pytorch-fid's InceptionV3 (pool3 block) returning [B, 2048]."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inception(images)[0].flatten(1)


def load_pytorch_fid_inception(
    weights_path: str | Path | None, device: torch.device | str = "cpu"
) -> nn.Module:
    """pytorch-fid's FID InceptionV3 with weights from a local file -> module [B,3,H,W] -> [B, 2048].

    weights_path: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (a plain state dict, read with
    torch.load(weights_only=True)). pytorch-fid would download it; here its download function is
    replaced, for the duration of the build only, by a function that returns this file's tensors.
    """
    if weights_path is None:
        raise SafediffError(
            f"FID needs Inception weights: pass --inception /path/{PYTORCH_FID_WEIGHTS} "
            "(pytorch-fid's FID Inception weights; nothing is downloaded)"
        )
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise SafediffError(
            f"Inception weights not found: {path} (expected pytorch-fid's {PYTORCH_FID_WEIGHTS})"
        )
    try:
        from pytorch_fid import inception as pfi
    except ImportError as err:
        raise SafediffError(
            "FID with Inception needs pytorch-fid: pip install pytorch-fid"
        ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refusals, truncated or foreign files
        raise SafediffError(f"could not read Inception weights {path}: {err}") from err
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]

    def _local_weights(*args: Any, **kwargs: Any) -> Mapping[str, torch.Tensor]:
        return state

    try:
        with mock.patch.object(pfi, "load_state_dict_from_url", _local_weights):
            inception = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    except RuntimeError as err:  # load_state_dict key / shape mismatch
        msg = str(err).splitlines()[0]
        raise SafediffError(f"{path} is not pytorch-fid's FID Inception state dict: {msg}") from err
    return _PytorchFidFeatures(inception).eval().requires_grad_(False).to(device)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class FIDScorer:
    """FID behind the `Scorer` interface (a set metric; see the module docstring).

    extractor: images [B, 3, H, W] in [0, 1] on `device` -> features [B, F] (or [B, F, 1, 1]).
    reference: a folder of reference images, a pytorch-fid .npz (mu, sigma), or (mu, sigma).
    implementation: the protocol's implementation name ('fid/<implementation>').
    device: where images are sent for the extractor. batch_size: images per extractor call.
    """

    kind = "distance"
    value_key = None
    value_type = None

    def __init__(
        self,
        extractor: FeatureExtractor,
        reference: str | Path | tuple[np.ndarray, np.ndarray],
        implementation: str = "custom-features",
        device: torch.device | str = "cpu",
        batch_size: int = 32,
    ):
        self.extractor = extractor
        self.reference = reference
        self.protocol = f"fid/{implementation}"
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self._reference_stats: tuple[np.ndarray, np.ndarray] | None = None
        self.n_reference: int | None = None
        self.reset()
        if not isinstance(reference, tuple):
            path = Path(reference).expanduser()
            if not (path.is_dir() or path.is_file()):
                raise SafediffError(f"FID reference not found: {path} (a folder of images or .npz)")

    def reset(self) -> None:
        """Forget the features accumulated by `score_images`."""
        self._rows: list[np.ndarray] = []

    @property
    def features(self) -> np.ndarray:
        """Features of every image scored since the last reset, [N, F] float64."""
        if not self._rows:
            return np.zeros((0, 0), np.float64)
        return np.concatenate(self._rows, axis=0)

    @torch.no_grad()
    def _extract(self, batch: torch.Tensor) -> list[np.ndarray]:
        out = []
        for chunk in batch.split(self.batch_size):
            feats = self.extractor(chunk.to(self.device, torch.float32))
            if isinstance(feats, list | tuple):
                feats = feats[0]
            out.extend(feats.flatten(1).to("cpu", torch.float64).numpy())
        return out

    def extract_features(self, images: ImagesIn) -> np.ndarray:
        """Features [B, F] float64 of a tensor [B, 3, H, W] in [0, 1] or a list of paths."""
        rows = run_by_size(as_image_list(images, self.protocol), self._extract)
        return np.stack(rows) if rows else np.zeros((0, 0), np.float64)

    def reference_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [F], sigma [F, F]) of the reference, computed on first use and kept."""
        if self._reference_stats is not None:
            return self._reference_stats
        ref = self.reference
        if isinstance(ref, tuple):
            mu, sigma = (np.asarray(a, np.float64) for a in ref)
        else:
            path = Path(ref).expanduser()
            if path.is_file():
                try:
                    with np.load(path, allow_pickle=False) as f:
                        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
                except (KeyError, ValueError, OSError) as err:
                    raise SafediffError(
                        f"FID reference {path} is not a .npz with 'mu' and 'sigma': {err}"
                    ) from err
            else:
                files = _list_images(path)
                if len(files) < 2:
                    raise SafediffError(
                        f"FID reference folder {path} holds {len(files)} images "
                        f"({', '.join(IMAGE_SUFFIXES)}); it needs at least 2"
                    )
                feats = []
                for start in range(0, len(files), self.batch_size):
                    chunk = [load_image(p) for p in files[start : start + self.batch_size]]
                    feats.extend(run_by_size(chunk, self._extract))
                self.n_reference = len(files)
                mu, sigma = feature_statistics(np.stack(feats))
        self._reference_stats = (mu, sigma)
        return mu, sigma

    def score_images(
        self, images: ImagesIn, prompts: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Extract and keep features; per image: {'feature_row': row in `features`}."""
        feats = self.extract_features(images)
        start = sum(len(r) for r in self._rows)
        if len(feats):
            self._rows.append(feats)
        return [{"feature_row": start + i} for i in range(len(feats))]

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """FID of the features that `records` index against the reference statistics."""
        feats = self.features
        try:
            rows = [int(r["feature_row"]) for r in records]
        except KeyError as err:
            raise SafediffError(f"{self.protocol}: records lack 'feature_row'") from err
        if any(r < 0 or r >= len(feats) for r in rows):
            raise SafediffError(
                f"{self.protocol}: records index features this scorer has not computed "
                "(FID aggregates only the images scored by the same scorer instance)"
            )
        mu, sigma = feature_statistics(feats[rows])
        ref_mu, ref_sigma = self.reference_statistics()
        value = frechet_distance(mu, sigma, ref_mu, ref_sigma)
        nan = float("nan")
        reference = "statistics" if isinstance(self.reference, tuple) else str(self.reference)
        return make_aggregate(
            self.protocol,
            "distance",
            len(rows),
            "fid",
            {"fid": Estimate(value, nan, nan, len(rows), "frechet-distance")},
            value_key=None,
            value_type=None,
            reference=reference,
            n_reference=self.n_reference,
            feature_dim=int(feats.shape[1]),
        )


def build_fid_scorer(
    reference: str | Path,
    inception: str | Path | None,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> FIDScorer:
    """FID with pytorch-fid's Inception (weights from `inception`) against `reference`."""
    ref = Path(reference).expanduser()
    if not (ref.is_dir() or ref.is_file()):
        raise SafediffError(f"FID reference not found: {ref} (a folder of images or .npz)")
    extractor = load_pytorch_fid_inception(inception, device)
    return FIDScorer(extractor, reference, PYTORCH_FID_IMPLEMENTATION, device, batch_size)
