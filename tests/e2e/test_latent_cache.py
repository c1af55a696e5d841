"""A latent cache made by other weights is refused, naming both keys; a matching one loads."""

from __future__ import annotations

import pytest
import torch

from sora_lightning.data.ingest import shards_from_world
from sora_lightning.data.latent_cache import (
    CacheSettings,
    cache_key,
    load_cache,
    read_cache_meta,
    write_cache,
)
from sora_lightning.models.text import TextEncoder, TextEncoderConfig
from sora_lightning.models.vae import VAEConfig, VideoVAE
from sora_lightning.utils import state_dict_hash

pytestmark = pytest.mark.e2e


def test_cache_roundtrip_and_stale_refusal(tmp_path) -> None:
    shards_from_world(
        tmp_path / "shards", num_clips=3, num_images=2, seed=0, max_count=10, progress=False
    )
    vae = VideoVAE(
        VAEConfig(
            base_channels=8,
            channel_mults=(1, 2, 2),
            temporal_downsample=(True, True),
            norm_groups=4,
        )
    )
    text = TextEncoder(TextEncoderConfig(max_length=48))
    settings = CacheSettings(max_area=1024, multiple=8, max_frames=17)
    meta = write_cache(
        sorted((tmp_path / "shards").glob("*.tar")), tmp_path / "cache", vae, text, settings
    )
    expected = cache_key(state_dict_hash(vae.state_dict()), text.weights_hash(), settings)
    assert meta["key"] == expected and meta["num_samples"] == 5
    samples, null_text, _ = load_cache(tmp_path / "cache", expected)
    assert len(samples) == 5 and null_text.shape[1] == 384
    assert all(s.latent.shape[0] == 4 and {"detailed", "short"} <= set(s.texts) for s in samples)
    with torch.no_grad():
        next(vae.parameters()).add_(1.0)
    stale = cache_key(state_dict_hash(vae.state_dict()), text.weights_hash(), settings)
    with pytest.raises(ValueError) as error:
        read_cache_meta(tmp_path / "cache", stale)
    assert expected in str(error.value) and stale in str(error.value)
