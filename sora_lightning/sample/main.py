"""`sora-sample`: text-to-video, image-to-video (image=...), extension (video=...), editing
(video=... edit_strength=s), connecting two clips (video=... video_end=...) and long videos, to mp4.

How videos are sampled is the `sampling` node (conf/sampling/, e.g. `sampling.frames=33`).
`sampling.cond_position=end` puts the given frames at the end instead: `video=clip.mp4
sampling.cond_position=end` generates what leads up to the clip (pixel-frame mapping in
`sample/generate.py`). More frames than the model was trained on are sampled in overlapping
windows (`sampling.window_frames`, `sampling.window_overlap`).

Every mp4 is signed with a C2PA manifest when `provenance.cert`/`provenance.key` are set
(`sora-verify FILE` checks it); `safety.prompt_filter` and `safety.frame_filter` refuse prompts
and withhold videos (sample/safety.py). `prompt_expander=none|world|llm` rewrites prompts into the
caption form the model was trained on (sample/expand.py); the expansion is recorded in each mp4.
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
from sora_lightning.sample.expand import build_expander, expander_config, resolve_examples
from sora_lightning.sample.generate import (
    Given,
    load_generator,
    read_model_info,
    write_mp4,
)
from sora_lightning.sample.provenance import Provenance, generation_record
from sora_lightning.sample.safety import PromptRefused, Safety
from sora_lightning.utils import pick_device


def read_conditioning(image: str | None, video: str | None) -> np.ndarray | None:
    """Frames to hold fixed: an image (image-to-video) or a clip's frames (extension)."""
    if image and video:
        raise ValueError("give either image=... or video=..., not both")
    path = image or video
    if path is None:
        return None
    data = _read_media(path, "conditioning")
    return decode_image(data) if image else decode_video(data)[0]


def _read_media(path: str, role: str) -> bytes:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{role} file {path} does not exist; pass an existing path")
    return Path(path).read_bytes()


def read_given(cfg: DictConfig) -> Given:
    """The request's media and options: image=, video=, video_end=, edit_strength, connect_frames
    (decoded here; `Given.check` judges them)."""
    strength, video_end = cfg.get("edit_strength"), cfg.get("video_end")
    return Given(
        frames=read_conditioning(cfg.image, cfg.video),
        is_image=bool(cfg.image),
        end_frames=decode_video(_read_media(video_end, "video_end"))[0] if video_end else None,
        edit_strength=None if strength is None else float(strength),
        connect_frames=int(cfg.get("connect_frames", 1)),
    )


def prompts_of(cfg: DictConfig) -> list[str]:
    """`prompts`, else `num_prompts` held-out captions of the latent cache `prompts_from_cache`."""
    if cfg.prompts:
        return list(cfg.prompts)
    source = cfg.get("prompts_from_cache")
    if source:
        return held_out_captions(source, cfg.get("val_fraction", 0.0), cfg.get("num_prompts", 4))
    return []


def sample(cfg: DictConfig) -> list[Path]:
    """Generate every requested prompt; returns the written mp4 paths.

    Everything that can be refused is refused before the video model loads: sizes, the
    prompt expander, the provenance credentials (a test signature), the safety models and the
    prompts themselves.
    A video the frame filter flags is withheld (not written); with nothing written, it fails.
    """
    if not cfg.prompt and not cfg.prompts and not cfg.get("prompts_from_cache"):
        raise ValueError(
            'nothing to sample: pass prompt="...", prompts=[...] or prompts_from_cache=CACHE_DIR'
        )
    config = SamplingConfig.from_config(cfg.sampling)  # sizes checked before loading anything
    expansion = resolve_examples(expander_config(cfg), cfg.ckpt)
    provenance = Provenance.from_config(cfg.get("provenance"))
    safety = Safety.from_config(cfg.get("safety"))
    jobs = _screened(_jobs(cfg), safety)
    given = checked_request(cfg, config)
    device = pick_device(cfg.get("device", "auto"))
    expander = build_expander(expansion)
    generator = load_generator(cfg.ckpt, use_ema=cfg.use_ema, expander=expander).to(device)
    written = []
    for prompt, path in tqdm(jobs, desc="sampling", unit="video"):
        video = generator.generate(prompt, config, given)
        review = safety.review(video)
        if review.withheld:
            continue
        record = generation_record(video, safety=review.record)
        written.append(write_mp4(path, video, config.fps, provenance, record))
        windows = f" ({len(video.windows)} windows)" if len(video.windows) > 1 else ""
        print(f"{path}: {prompt!r} -> {video.expanded_prompt!r}{windows}")
    if safety.enabled:
        print(safety.summary())
    if jobs and not written:
        raise RuntimeError(f"no video written: all {len(jobs)} withheld by the safety checks")
    return written


def checked_request(cfg: DictConfig, config: SamplingConfig) -> Given:
    """The request's media, refused now where it cannot work: the combination, the sizes and,
    where the export records its VAE (dit.json), the frame counts, all before weights load."""
    given = read_given(cfg)
    info = read_model_info(cfg.ckpt)
    if info is not None:
        info.latent_shape(config)
    given.check(config, None if info is None else info.temporal_factor)
    if info is not None and info.trained_frames is None and config.window_frames is None:
        print(
            f"note: {cfg.ckpt} does not record the clip length it was trained on, so "
            f"{config.frames} frames are sampled in one pass; set sampling.window_frames to the "
            "trained length to sample longer videos in windows"
        )
    return given


def _jobs(cfg: DictConfig) -> list[tuple[str, Path]]:
    """(prompt, output path) pairs: `prompt` -> `out`, else each prompt -> `out_dir/NNN.mp4`."""
    if cfg.prompt:
        return [(cfg.prompt, Path(cfg.out))]
    return [(p, Path(cfg.out_dir) / f"{i:03d}.mp4") for i, p in enumerate(prompts_of(cfg))]


def _screened(jobs: list[tuple[str, Path]], safety: Safety) -> list[tuple[str, Path]]:
    """The jobs whose prompts the prompt filter allows; refuses the run if it allows none."""
    allowed = [(prompt, path) for prompt, path in jobs if safety.refusal(prompt) is None]
    if len(jobs) == 1 and not allowed:
        raise PromptRefused(jobs[0][0], safety.refusal(jobs[0][0]) or "")
    if jobs and not allowed:
        raise ValueError(f"all {len(jobs)} prompts refused by safety.prompt_filter (see above)")
    return allowed


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
