"""Cache VAE latents + text embeddings of webdataset shards (see sora_lightning/data/latent_cache.py).

`--num-parts P [--part I]` caches one part (a SLURM array task; I defaults to $SLURM_ARRAY_TASK_ID);
`--merge --output DIR` then writes the meta.json a single process would have written.
"""

from sora_lightning.data.latent_cache import main

if __name__ == "__main__":
    main()
