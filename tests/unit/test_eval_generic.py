"""Evaluation for any data: deterministic validation flow loss, PSNR/SSIM, contact sheets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from sora_lightning.data.packing import PackedBatch, pack_samples
from sora_lightning.diffusion import flow
from sora_lightning.eval.contact_sheet import contact_sheet, sheet_frame_indices, write_png
from sora_lightning.eval.reconstruction import reconstruction_metrics, ssim_window
from sora_lightning.models.dit import DiT, DiTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

DIT_TINY = Path(__file__).resolve().parents[2] / "conf" / "model" / "dit" / "tiny.yaml"
# (C, F, h, w) latents of different shapes, text lengths, conditioning frames
LATENT_SHAPES = [(4, 2, 4, 6), (4, 1, 2, 2), (4, 3, 4, 4), (4, 2, 2, 4)]
TEXT_LENS = [5, 3, 7, 2]
COND_FRAMES = [1, 0, -1, 0]


@pytest.fixture(scope="module")
def dit() -> DiT:
    """Tiny DiT nudged off its zero init so the prediction (and the loss) depends on the input."""
    cfg: DiTConfig = instantiate(OmegaConf.load(DIT_TINY))
    cfg.attn_backend = "sdpa"
    generator = torch.Generator().manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def samples() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(shape, generator=generator), torch.randn(length, 384, generator=generator), k)
        for shape, length, k in zip(LATENT_SHAPES, TEXT_LENS, COND_FRAMES, strict=True)
    ]


def pack(samples: list, ids: list[int]) -> PackedBatch:
    return pack_samples(
        [samples[i][0] for i in ids],
        [samples[i][1] for i in ids],
        (1, 2, 2),
        capacity=1000,
        cond_frames=[samples[i][2] for i in ids],
    )


def grouped_loss(model: DiT, samples: list, groups: list[list[int]], seed: int = 7) -> float:
    parts = [
        flow.validation_loss(model, pack(samples, ids), ids, seed=seed, num_timesteps=3)
        for ids in groups
    ]
    return flow.mean_validation_loss(parts)


# --- validation flow loss -------------------------------------------------------------------


def test_validation_timesteps_are_bin_midpoints() -> None:
    assert torch.equal(flow.validation_timesteps(4), torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.equal(flow.validation_timesteps(1), torch.tensor([0.5]))
    with pytest.raises(ValueError):
        flow.validation_timesteps(0)


def test_fixed_noise_is_keyed_by_seed_and_index_only() -> None:
    first = flow.fixed_noise((5, 3), seed=1, index=4)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(first, flow.fixed_noise((5, 3), seed=1, index=4))
    assert not torch.equal(first, flow.fixed_noise((5, 3), seed=1, index=5))
    assert not torch.equal(first, flow.fixed_noise((5, 3), seed=2, index=4))
    with pytest.raises(ValueError):
        flow.fixed_noise((2,), seed=0, index=-1)


def test_a_sample_gets_the_same_noise_in_any_batch(samples: list) -> None:
    alone = flow.validation_noise(pack(samples, [2]), [2], seed=3)
    for ids in ([0, 2, 1], [2, 3], [3, 1, 0, 2]):
        batch = pack(samples, ids)
        pieces = batch.split_tokens(flow.validation_noise(batch, ids, seed=3))
        assert torch.equal(pieces[ids.index(2)], alone)


def test_validation_loss_is_the_training_loss_at_fixed_t_and_noise(dit: DiT, samples: list) -> None:
    ids = [0, 1, 2]
    batch = pack(samples, ids)
    noise = flow.validation_noise(batch, ids, seed=7)
    expected = torch.stack(
        [
            flow.packed_batch_loss(dit, batch, t.repeat(3), noise)
            for t in flow.validation_timesteps(2)
        ]
    ).mean()
    loss, num_scored = flow.validation_loss(dit, batch, ids, seed=7, num_timesteps=2)
    assert torch.equal(loss, expected) and num_scored == 3


def test_validation_loss_is_deterministic_and_independent_of_batching(
    dit: DiT, samples: list
) -> None:
    together = grouped_loss(dit, samples, [[0, 1, 2, 3]])
    torch.manual_seed(99)
    assert grouped_loss(dit, samples, [[0, 1, 2, 3]]) == together  # bit for bit
    for groups in ([[3, 1], [0, 2]], [[2], [0], [3], [1]], [[1, 3, 0], [2]]):
        # equal up to float rounding: the DiT's output for a sample changes by ~1e-7 with packing
        assert math.isclose(grouped_loss(dit, samples, groups), together, rel_tol=1e-5)
    assert not math.isclose(
        grouped_loss(dit, samples, [[0, 1, 2, 3]], seed=8), together, rel_tol=1e-3
    )


def test_validation_loss_closed_form_for_a_zero_model(samples: list) -> None:
    """Predicting v = 0 costs mean((noise - x0)^2) per sample at every t."""
    ids = [0, 1]
    batch = pack(samples, ids)
    zero = lambda x_t, *args, **kwargs: torch.zeros_like(x_t)  # noqa: E731
    loss, _ = flow.validation_loss(zero, batch, ids, seed=5, num_timesteps=4)
    noise = flow.validation_noise(batch, ids, seed=5)
    keep = [1.0 - m for m in batch.split_tokens(batch.cond_mask)]
    per_sample = [
        ((n - x).pow(2).mean(-1) * k).sum() / k.sum()
        for n, x, k in zip(
            batch.split_tokens(noise), batch.split_tokens(batch.x), keep, strict=True
        )
    ]
    assert torch.allclose(loss, torch.stack(per_sample).mean(), rtol=1e-6, atol=0)


def test_all_conditioning_batches_are_skipped_in_the_mean(samples: list) -> None:
    zero = lambda x_t, *args, **kwargs: torch.zeros_like(x_t)  # noqa: E731
    latent, text, _ = samples[1]  # one latent frame, all of it conditioning
    batch = pack_samples([latent], [text], (1, 2, 2), capacity=100, cond_frames=[1])
    loss, num_scored = flow.validation_loss(zero, batch, [9])
    assert num_scored == 0 and torch.isnan(loss)
    assert flow.mean_validation_loss([(loss, 0), (torch.tensor(2.0), 3)]) == 2.0
    with pytest.raises(ValueError):
        flow.mean_validation_loss([(loss, 0)])
    with pytest.raises(ValueError):
        flow.validation_loss(zero, batch, [1, 2])


# --- reconstruction metrics -----------------------------------------------------------------


def test_psnr_matches_hand_computation_and_ssim_of_identity_is_one() -> None:
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 246, (3, 16, 20, 3), dtype=np.uint8)
    brighter = lambda frames: frames + np.uint8(10)  # noqa: E731  MSE = 100 everywhere
    scores = reconstruction_metrics(brighter, [clip])
    assert math.isclose(scores["psnr"], 10 * math.log10(255**2 / 100), rel_tol=1e-6)
    assert scores["ssim"] < 1.0
    same = reconstruction_metrics(lambda frames: frames.copy(), [clip, clip[:, :8, :9]])
    assert same["psnr"] == math.inf
    assert math.isclose(same["ssim"], 1.0, abs_tol=1e-9)
    assert [record["ssim"] for record in same["per_clip"]] == pytest.approx([1.0, 1.0])


def test_clips_of_varying_size_are_averaged_and_small_ones_counted() -> None:
    rng = np.random.default_rng(1)
    clips = [
        rng.integers(0, 256, shape, dtype=np.uint8)
        for shape in [(2, 12, 16, 3), (1, 32, 24, 3), (4, 7, 5, 3), (2, 2, 40, 3)]
    ]

    def noisy(frames: np.ndarray) -> np.ndarray:
        shifted = frames.astype(np.int16) + rng.integers(-20, 21, frames.shape)
        return np.clip(shifted, 0, 255).astype(np.uint8)

    scores = reconstruction_metrics(noisy, iter(clips))
    records = scores["per_clip"]
    assert scores["num_clips"] == 4 and [r["shape"] for r in records][2] == [4, 7, 5]
    assert [r["ssim_window"] for r in records] == [11, 11, 5, None]
    assert scores["ssim_reduced_window"] == 1 and scores["ssim_skipped"] == 1
    assert math.isnan(records[3]["ssim"]) and 0.0 < scores["ssim"] < 1.0
    assert math.isclose(scores["psnr"], np.mean([r["psnr"] for r in records]))
    assert math.isclose(scores["ssim"], np.mean([r["ssim"] for r in records[:3]]))


def test_ssim_window_fits_the_frame() -> None:
    assert ssim_window(64, 48) == (11, 1.5)
    assert [ssim_window(size, 100)[0] for size in (3, 4, 5, 9, 10, 11)] == [3, 3, 5, 9, 9, 11]
    assert ssim_window(2, 100) is None and ssim_window(100, 1) is None


def test_bad_reconstructions_are_rejected() -> None:
    clip = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="clip 0"):
        reconstruction_metrics(lambda frames: frames[:, :4], [clip])
    with pytest.raises(ValueError, match=r"clip 0: reconstruct\(clip\) must be uint8"):
        reconstruction_metrics(lambda frames: frames.astype(np.float32), [clip])
    with pytest.raises(ValueError, match="clip 1: the clip must be uint8"):
        reconstruction_metrics(lambda frames: frames, [clip, clip.astype(np.float32)])
    with pytest.raises(ValueError):
        reconstruction_metrics(lambda frames: frames, [])


# --- contact sheets -------------------------------------------------------------------------


def numbered_frames(num: int, height: int = 4, width: int = 5) -> np.ndarray:
    """Frame i is filled with the value i + 1 (0 stays the background)."""
    values = np.arange(1, num + 1, dtype=np.uint8)
    return np.broadcast_to(values[:, None, None, None], (num, height, width, 3)).copy()


def test_sheet_layout_and_frame_positions() -> None:
    frames = numbered_frames(5)
    sheet = contact_sheet(frames, columns=3, pad=2)
    assert sheet.shape == (2 * (4 + 2) + 2, 3 * (5 + 2) + 2, 3) and sheet.dtype == np.uint8
    for index in range(5):
        row, column = divmod(index, 3)
        top, left = 2 + row * 6, 2 + column * 7
        assert np.array_equal(sheet[top : top + 4, left : left + 5], frames[index])
    painted = sum(4 * 5 for _ in range(5))
    assert int((sheet[..., 0] > 0).sum()) == painted  # padding and the empty tile stay black


def test_long_clips_are_sampled_uniformly_first_and_last_kept() -> None:
    assert sheet_frame_indices(5, 16).tolist() == [0, 1, 2, 3, 4]
    assert sheet_frame_indices(31, 4).tolist() == [0, 10, 20, 30]
    sheet = contact_sheet(numbered_frames(31), max_frames=4, pad=0)  # default columns: 2 x 2
    assert sheet.shape == (8, 10, 3)
    assert [sheet[0, 0, 0], sheet[0, 5, 0], sheet[4, 0, 0], sheet[4, 5, 0]] == [1, 11, 21, 31]
    with pytest.raises(ValueError):
        contact_sheet(numbered_frames(3).astype(np.float32))


def test_write_png_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    sheet = contact_sheet(numbered_frames(3) * 40, columns=1)
    path = write_png(tmp_path / "sub" / "sheet.png", sheet)
    assert np.array_equal(np.asarray(Image.open(path)), sheet)
    write_png(path, sheet[:5])  # overwrite in place
    assert np.asarray(Image.open(path)).shape == (5, *sheet.shape[1:])
    assert sorted(p.name for p in path.parent.iterdir()) == ["sheet.png"]
