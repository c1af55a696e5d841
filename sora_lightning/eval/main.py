"""`sora-eval`: generate the held-out prompts and score colour, shape and motion adherence."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sora_lightning.data.world import eval_prompts, seen_prompts
from sora_lightning.eval.evaluate import evaluate, headline
from sora_lightning.sample.generate import SampleOptions, load_generator
from sora_lightning.train.main import CONF_DIR
from sora_lightning.utils import write_json_atomic

PROMPT_SETS = {"held_out": eval_prompts, "seen": seen_prompts}
"""`prompt_set` choices: the held-out triples (the benchmark), or 2 training triples per eval motion."""


def _prompts(name: str) -> list[str]:
    """The prompts of set `name`; an unknown name is rejected before any work."""
    if name not in PROMPT_SETS:
        raise ValueError(f"prompt_set={name!r} is not one of {sorted(PROMPT_SETS)}")
    return PROMPT_SETS[name]()


def run_eval(cfg: DictConfig) -> dict:
    """Write `eval.json` with accuracies, the detector's accuracy on truth, and chance levels."""
    prompt_set = cfg.get("prompt_set", "held_out")
    prompts = _prompts(prompt_set)
    settings = SampleOptions.from_config(cfg, seed=0)  # rejects bad sizes before any work
    generator = load_generator(cfg.ckpt)

    def generate(prompt: str, seed: int):
        return generator.generate(prompt, replace(settings, seed=seed)).frames

    scores = evaluate(
        generate,
        prompts=prompts,
        num_seeds=cfg.num_seeds,
        truth_clips=cfg.truth_clips,
        reconstruct=generator.reconstruct if cfg.ceiling_clips else None,
        ceiling_clips=cfg.ceiling_clips,
    )
    scores["settings"] = {k: v for k, v in asdict(settings).items() if k != "seed"}
    scores["prompt_set"] = prompt_set
    write_json_atomic(Path(cfg.out_dir) / "eval.json", scores)
    print(headline(scores))
    return scores


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_eval(cfg)


if __name__ == "__main__":
    main()
