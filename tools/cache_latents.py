"""Cache VAE latents + text embeddings of shards: `sora-train task=cache` under another name.

It composes the same config as training, so the cache key it writes is the one `sora-train
task=dit` expects for the same overrides:

    python tools/cache_latents.py experiment=tiny data.shards='runs/x/shards/*.tar' \
        data.vae_dir=runs/x/vae data.cache_dir=runs/x/cache
    # SLURM array task I of P (I from $SLURM_ARRAY_TASK_ID), then the merge:
    python tools/cache_latents.py ... cache.num_parts=P
    python tools/cache_latents.py ... cache.merge=true
"""

import sys

from sora_lightning.train.main import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "task=cache", *sys.argv[1:]]
    main()
