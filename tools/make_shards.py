"""Write webdataset shards from the embedded world, a folder, or a manifest.

Examples:
    python tools/make_shards.py --world-clips 64 --world-images 32 --seed 0 --output runs/x/shards
    python tools/make_shards.py --input my_videos/ --output runs/x/shards
    python tools/make_shards.py --manifest data.jsonl --output runs/x/shards

A thin wrapper: the logic lives in `sora_lightning.data.ingest` (its `main`).
"""

from __future__ import annotations

from sora_lightning.data.ingest import main

if __name__ == "__main__":
    raise SystemExit(main())
