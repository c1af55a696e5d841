"""Export DiT (EMA) + VAE weights into one safetensors folder for `sora-sample`."""

from sora_lightning.train.export import main

if __name__ == "__main__":
    main()
