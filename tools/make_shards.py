"""Write webdataset shards from the embedded world, a folder, or a manifest.

Examples:
    python tools/make_shards.py --world-clips 64 --world-images 32 --seed 0 --output runs/x/shards
    python tools/make_shards.py --input my_videos/ --output runs/x/shards
    python tools/make_shards.py --manifest data.jsonl --output runs/x/shards --workers 8
    # SLURM job array (sbatch --array=0-15): each task writes shard-{I:03d}-*.tar and
    # summary.part-{I:03d}.json; one job after the array writes summary.json.
    python tools/make_shards.py --manifest data.jsonl --output D --num-parts 16 --part $SLURM_ARRAY_TASK_ID
    python tools/make_shards.py --merge-summaries --output D

Re-running with the same inputs and settings finds the finished summary and does nothing.

A thin wrapper: the logic lives in `sora_lightning.data.ingest` (its `main`).
"""

from __future__ import annotations

from sora_lightning.data.ingest import main

if __name__ == "__main__":
    raise SystemExit(main())
