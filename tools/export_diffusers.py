"""Write a Wan-config export back as a diffusers folder WanPipeline.from_pretrained loads.

python tools/export_diffusers.py --export EXPORT --output OUT
"""

from sora_lightning.train.export_diffusers import main

if __name__ == "__main__":
    main()
