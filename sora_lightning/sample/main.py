"""`sora-sample`: text-to-video, image-to-video (image=...) and video extension (video=...) to mp4.

How videos are sampled is the `sampling` node (conf/sampling/, e.g. `sampling.frames=33`).
`sampling.cond_position=end` puts the given frames at the end instead: `video=clip.mp4
sampling.cond_position=end` generates what leads up to the clip (pixel-frame mapping in
`sample/generate.py`).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from sora_lightning.config import CONFIG_PATH
from sora_lightning.data.decode import decode_image, decode_video
from sora_lightning.data.latent_cache import held_out_captions
from sora_lightning.diffusion.sampling import SamplingConfig
from sora_lightning.sample.generate import load_generator, write_mp4


def read_conditioning(image: str | None, video: str | None) -> np.ndarray | None:
    """Frames to hold fixed: an image (image-to-video) or a clip's frames (extension)."""
    if image and video:
        raise ValueError("give either image=... or video=..., not both")
    path = image or video
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"conditioning file {path} does not exist; pass an existing image or video path"
        )
    data = Path(path).read_bytes()
    return decode_image(data) if image else decode_video(data)[0]


def prompts_of(cfg: DictConfig) -> list[str]:
    """`prompts`, else `num_prompts` held-out captions of the latent cache `prompts_from_cache`."""
    if cfg.prompts:
        return list(cfg.prompts)
    source = cfg.get("prompts_from_cache")
    if source:
        return held_out_captions(source, cfg.get("val_fraction", 0.0), cfg.get("num_prompts", 4))
    return []


def sample(cfg: DictConfig) -> list[Path]:
    """Generate every requested prompt; returns the written mp4 paths."""
    if not cfg.prompt and not cfg.prompts and not cfg.get("prompts_from_cache"):
        raise ValueError(
            'nothing to sample: pass prompt="...", prompts=[...] or prompts_from_cache=CACHE_DIR'
        )
    config = SamplingConfig.from_config(cfg.sampling)  # sizes checked before loading anything
    generator = load_generator(cfg.ckpt, use_ema=cfg.use_ema, expand_prompts=cfg.expand_prompt)
    cond = read_conditioning(cfg.image, cfg.video)
    jobs = (
        [(cfg.prompt, Path(cfg.out))]
        if cfg.prompt
        else [(p, Path(cfg.out_dir) / f"{i:03d}.mp4") for i, p in enumerate(prompts_of(cfg))]
    )
    written = []
    for prompt, path in tqdm(jobs, desc="sampling", unit="video"):
        video = generator.generate(prompt, config, cond_frames=cond)
        written.append(write_mp4(path, video, config.fps))
        print(f"{path}: {prompt!r} -> {video.expanded_prompt!r}")
    return written


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
