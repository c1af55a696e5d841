"""Cache VAE latents + text embeddings of webdataset shards (see sora_lightning/data/latent_cache.py)."""

from sora_lightning.data.latent_cache import main

if __name__ == "__main__":
    main()
