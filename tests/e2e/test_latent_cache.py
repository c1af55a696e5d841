"""A latent cache made by other weights is refused, naming both keys; a matching one loads.
Array parts + merge give the very cache one process gives."""

from __future__ import annotations

import pytest
import torch

from sora_lightning.data.clips import decode_fitted, to_model_range, valid_length
from sora_lightning.data.ingest import shards_from_world
from sora_lightning.data.latent_cache import (
    CacheSettings,
    cache_key,
    load_cache,
    merge_cache_parts,
    read_cache_meta,
    write_cache,
    write_cache_part,
)
from sora_lightning.data.shards import load_samples
from sora_lightning.models.text import TextEncoder, TextEncoderConfig
from sora_lightning.models.vae import VAEConfig, VideoVAE
from sora_lightning.utils import state_dict_hash

pytestmark = pytest.mark.e2e


def tiny_vae() -> VideoVAE:
    config = VAEConfig(
        base_channels=8, channel_mults=(1, 2, 2), temporal_downsample=(True, True), norm_groups=4
    )
    return VideoVAE(config)


SETTINGS = CacheSettings(max_area=1024, multiple=8, max_frames=17)


def test_cache_roundtrip_and_stale_refusal(tmp_path) -> None:
    shards_from_world(
        tmp_path / "shards", num_clips=3, num_images=2, seed=0, max_count=10, progress=False
    )
    vae = tiny_vae()
    text = TextEncoder(TextEncoderConfig(max_length=48))
    settings = SETTINGS
    meta = write_cache(
        sorted((tmp_path / "shards").glob("*.tar")), tmp_path / "cache", vae, text, settings
    )
    expected = cache_key(state_dict_hash(vae.state_dict()), text.states_hash(), settings)
    assert meta["key"] == expected and meta["num_samples"] == 5
    samples, null_text, _ = load_cache(tmp_path / "cache", expected)
    assert len(samples) == 5 and null_text.shape[1] == 384
    assert all(s.latent.shape[0] == 4 and {"detailed", "short"} <= set(s.texts) for s in samples)
    with torch.no_grad():
        next(vae.parameters()).add_(1.0)
    stale = cache_key(state_dict_hash(vae.state_dict()), text.states_hash(), settings)
    with pytest.raises(ValueError) as error:
        read_cache_meta(tmp_path / "cache", stale)
    assert expected in str(error.value) and stale in str(error.value)


def test_array_parts_merge_to_the_single_process_cache(tmp_path) -> None:
    shards_from_world(
        tmp_path / "shards", num_clips=3, num_images=2, seed=0, max_count=2, progress=False
    )
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert len(shards) == 3
    vae, text = tiny_vae(), TextEncoder(TextEncoderConfig(max_length=48))
    single = write_cache(shards, tmp_path / "single", vae, text, SETTINGS)
    for num_parts in (2, 4):  # 4 > 3 shards: part 3 caches nothing and must still merge
        out = tmp_path / f"parts{num_parts}"
        for part in reversed(range(num_parts)):
            write_cache_part(shards, out, vae, text, SETTINGS, num_parts=num_parts, part=part)
        assert not (out / "meta.json").exists()
        assert merge_cache_parts(out) == single
        assert (out / "meta.json").read_bytes() == (tmp_path / "single" / "meta.json").read_bytes()
        merged, null_merged, _ = load_cache(out, single["key"])
        ref, null_ref, _ = load_cache(tmp_path / "single", single["key"])
        assert [s.key for s in merged] == [s.key for s in ref]  # same order: same training
        assert all(torch.equal(a.latent, b.latent) for a, b in zip(merged, ref, strict=True))
        assert torch.equal(null_merged, null_ref)


def test_merge_names_missing_parts(tmp_path) -> None:
    shards_from_world(
        tmp_path / "shards", num_clips=2, num_images=1, seed=0, max_count=1, progress=False
    )
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    vae, text = tiny_vae(), TextEncoder(TextEncoderConfig(max_length=48))
    write_cache_part(shards, tmp_path / "c", vae, text, SETTINGS, num_parts=3, part=0)
    with pytest.raises(FileNotFoundError, match=r"rerun the --part tasks \[1, 2\]"):
        merge_cache_parts(tmp_path / "c")


def test_cache_encodes_the_pixels_the_vae_loaders_see(tmp_path) -> None:
    """World clips (64x48) exceed max_area 1024 and get resized: the cache fits them with the
    VAE loaders' FFmpeg path (`decode_fitted`), so the DiT trains on latents of those pixels."""
    shards_from_world(
        tmp_path / "shards", num_clips=2, num_images=1, seed=0, max_count=10, progress=False
    )
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    vae, text = tiny_vae().eval(), TextEncoder(TextEncoderConfig(max_length=48))
    meta = write_cache(shards, tmp_path / "cache", vae, text, SETTINGS)
    assert meta["settings"]["resize"] == "ffmpeg_bilinear"
    raw = {sample.key: sample for sample in load_samples(shards)}
    cached, _, _ = load_cache(tmp_path / "cache", meta["key"])
    for sample in cached:
        source = raw[sample.key]
        factor = vae.config.temporal_factor
        length = valid_length(int(source.meta["frames"]), factor, SETTINGS.max_frames)
        frames = decode_fitted(
            source, max_area=SETTINGS.max_area, multiple=8, frame_indices=list(range(length))
        )
        assert frames.shape[1] * frames.shape[2] <= SETTINGS.max_area < 64 * 48
        with torch.no_grad():
            want = vae.encode(to_model_range(frames).unsqueeze(0)).mode()[0]
        torch.testing.assert_close(sample.latent, want, atol=1e-5, rtol=1e-5)
