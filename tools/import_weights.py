"""Import published weights as an export `sora-sample ckpt=EXPORT` loads, or write one back.

    python tools/import_weights.py --diffusers Wan2.1-T2V-1.3B-Diffusers --output EXPORT
    python tools/import_weights.py --to-diffusers OUT --export EXPORT

The first converts a diffusers Wan 2.1 text-to-video folder (`train/import_wan.py`); the second
writes a (fine-tuned) Wan-config export back as a diffusers folder (`train/export_diffusers.py`).
"""

from __future__ import annotations

import argparse

from sora_lightning.train.import_wan import import_wan21


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--diffusers", help="diffusers Wan 2.1 T2V folder to import")
    parser.add_argument("--output", help="export folder to write (new or empty)")
    parser.add_argument(
        "--reference-text-encoder",
        action="store_true",
        help="name the source's UMT5 folder by absolute path instead of copying it (11 GB)",
    )
    parser.add_argument("--to-diffusers", help="write --export back as a diffusers folder here")
    parser.add_argument("--export", help="with --to-diffusers: the export folder to convert")
    args = parser.parse_args(argv)
    if args.to_diffusers:
        if not args.export:
            parser.error("--to-diffusers needs --export EXPORT")
        from sora_lightning.train.export_diffusers import export_to_diffusers

        print(f"wrote {export_to_diffusers(args.export, args.to_diffusers)}")
        return
    if not (args.diffusers and args.output):
        parser.error("pass --diffusers DIR --output EXPORT (or --to-diffusers OUT --export EXPORT)")
    output = import_wan21(
        args.diffusers, args.output, copy_text_encoder=not args.reference_text_encoder
    )
    print(f"imported {args.diffusers} -> {output}")


if __name__ == "__main__":
    main()
