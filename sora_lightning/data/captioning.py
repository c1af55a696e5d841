"""Recaptioning: a vision-language model writes a detailed caption for every sample of shards.

Why sidecar files and not new shards: shards are immutable (media bytes untouched) and a user's
own shards (`dataset=shards`) are never written. So captions go to a folder of their own, one
`<shard>.jsonl` per input shard (`{"key", "caption"}` per line) plus `<shard>.done.json`, written
atomically after it, which names the shard's sha256, the captions file's sha256 and the
captioner (weights hash, instruction, frames, size). A killed run starts again and skips every
shard whose done record still verifies; at most the shard in progress is redone. `meta.json`
(written when every shard is done, or by `--merge` after a job array) is what readers open.

The latent cache merges these captions into each sample's `captions` dict under `field`
(`AddedCaptions`): added, never overwriting a caption the sample already has, and the cache key
covers `AddedCaptions.source`, so another captioner or instruction gives another cache.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sora_lightning.data.captioners import VLMAdapter, load_adapter, model_family
from sora_lightning.data.captioners import world as world_captioner
from sora_lightning.data.captioners.base import HINT, Clip
from sora_lightning.data.decode import MediaError, decode_video, probe
from sora_lightning.data.parts import resolve_part, select_part
from sora_lightning.data.resize import FitFrame
from sora_lightning.data.shards import BadSampleCounter, RawSample, iter_shard_samples
from sora_lightning.utils import combined_hash, file_sha256, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
META_NAME = "meta.json"
DEFAULT_INSTRUCTION = (
    "Describe this video in detail: every object and its colour, shape and size, where it is, "
    "how it moves and in which direction, the background and the camera."
)
FIELD_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.json", "*.jinja")
"""Files of a model folder whose bytes decide its captions (weights, config, tokenizer, template)."""


@dataclass
class CaptionConfig:
    """The `caption` node (conf/caption/): which VLM captions, how, and under which field."""

    enabled: bool = False
    """Run the pipeline's caption step (after shards) and train on its captions."""
    model: str | None = None
    """A local Hugging Face VLM folder (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision; no download), or
    `world`: a small CNN trained in the step on the labelled clips of world alt-text shards."""
    field: str = "vlm"
    """Name of the added caption in each sample's `captions` (select it in data.caption_probs)."""
    instruction: str = DEFAULT_INSTRUCTION
    """What the VLM is asked; part of the captions' identity (and so of the cache key)."""
    frames: int = 8
    """Frames sampled uniformly from each clip (an image is one frame)."""
    size: int = 448
    """Frames are fitted under size x size pixels, aspect ratio kept (never upscaled)."""
    batch_size: int = 8
    """Clips per generate call."""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32."""
    device: str = "auto"
    """auto (cuda when present) | cpu | cuda | cuda:N."""
    max_new_tokens: int = 256
    """Longest caption in tokens."""
    hint_field: str | None = None
    """A caption field each sample already has (alt_text) to show the captioner as `{hint}` in
    the instruction; the world captioner describes the object it names. None: no hint."""

    def __post_init__(self) -> None:
        if not FIELD_PATTERN.match(self.field) or self.field == "caption":
            raise ValueError(
                f"caption.field={self.field!r} must be a lowercase name (letters, digits, _) other "
                "than 'caption'"
            )
        if min(self.frames, self.size, self.batch_size, self.max_new_tokens) < 1:
            raise ValueError("caption.frames, size, batch_size and max_new_tokens must be >= 1")
        if not self.instruction.strip():
            raise ValueError("caption.instruction must not be empty")
        self._check_hint()
        folder = self.model == world_captioner.MODEL_NAME or (
            self.model and Path(self.model).expanduser().is_dir()
        )
        if self.enabled and not folder:
            raise ValueError(
                f"caption.enabled=true needs caption.model=<a local model folder>, got {self.model}"
            )

    def _check_hint(self) -> None:
        """A hint a VLM's instruction never shows, or a `{hint}` with no field to fill it, is a
        mistake found before any captioning (the world captioner reads the hint itself)."""
        if self.hint_field is not None and not FIELD_PATTERN.match(self.hint_field):
            raise ValueError(f"caption.hint_field={self.hint_field!r} is not a caption field name")
        shows = HINT in self.instruction
        if self.hint_field is None and shows:
            raise ValueError(
                f"caption.instruction has {HINT} but caption.hint_field is null: name the field "
                "to fill it (caption.hint_field=alt_text) or drop it from the instruction"
            )
        if self.hint_field is not None and not shows and self.model != world_captioner.MODEL_NAME:
            raise ValueError(
                f"caption.hint_field={self.hint_field} but caption.instruction has no {HINT}: "
                f'put it where the VLM should read it ("... The original caption: {HINT}")'
            )

    @classmethod
    def from_config(cls, node: Any) -> CaptionConfig:
        """From the composed `caption` node (None: recaptioning off); unknown keys are an error."""
        values = {} if node is None else dict(node.items())
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown caption keys {unknown}; known: {sorted(asdict(cls()))}")
        return cls(**values)

    def as_args(self) -> list[str]:
        """The CLI flags of this module that reproduce this config (the pipeline step's command)."""
        model = str(self.model)
        if model != world_captioner.MODEL_NAME:
            model = str(Path(model).expanduser().resolve())
        args = ["--model", model, "--field", self.field, "--instruction", self.instruction]
        args += ["--frames", str(self.frames), "--size", str(self.size)]
        args += ["--batch-size", str(self.batch_size), "--dtype", self.dtype]
        args += ["--device", self.device, "--max-new-tokens", str(self.max_new_tokens)]
        return args + (["--hint-field", self.hint_field] if self.hint_field else [])


def model_hash(model_dir: str | Path) -> str:
    """sha256 over the names and bytes of the files that decide the model's captions."""
    folder = Path(model_dir)
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise FileNotFoundError(f"{folder} holds no *.safetensors or *.bin weights")
    return combined_hash(*(f"{p.name}:{file_sha256(p)}" for p in files))


def caption_identity(config: CaptionConfig) -> dict[str, Any]:
    """Everything that decides the captions' text; equal identities give the same captions."""
    return {
        "model_hash": model_hash(str(config.model)),
        "family": model_family(str(config.model)),
        "field": config.field,
        "instruction": config.instruction,
        "frames": config.frames,
        "size": config.size,
        "max_new_tokens": config.max_new_tokens,
        **hint_identity(config),
    }


def hint_identity(config: CaptionConfig) -> dict[str, str]:
    """The hint field in the captions' identity (absent without one, so the identities, and the
    cache keys, of captions made without a hint stay as they were)."""
    return {"hint_field": config.hint_field} if config.hint_field else {}


def source_hash(identity: dict[str, Any]) -> str:
    """The captions' source in one short hash (what the latent cache key covers)."""
    return combined_hash(json.dumps(identity, sort_keys=True))


def uniform_indices(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over a clip: the middle of `count` equal segments.

    Why segment middles (not both ends): every part of the clip is seen equally, and decoding
    can stop before the clip's last frames (`decode_video` stops after the largest index).
    A clip shorter than `count` gives each of its frames once.
    """
    count = min(count, num_frames)
    return [int((i + 0.5) * num_frames / count) for i in range(count)]


def end_indices(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly from the first frame to the last, both included.

    Why: a captioner that says where an object starts and how fast it goes (the world's) must see
    the first frame; segment middles (`uniform_indices`) start up to half a segment later.
    """
    count = min(count, num_frames)
    if count == 1:
        return [0]
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)]


def read_clip(
    sample: RawSample, frames: int, size: int, multiple: int, ends: bool = False
) -> tuple[Clip, int]:
    """The sample's uniformly sampled frames fitted under size^2 pixels, and frames decoded
    (`ends`: from the first frame to the last, `end_indices`; else segment middles)."""
    total = int(sample.meta.get("frames") or 0) or probe(sample.media).num_frames
    spread = end_indices if ends else uniform_indices
    indices = [0] if sample.is_image else spread(max(total, 1), frames)
    fit = FitFrame(max_area=size * size, multiple=multiple)
    pixels, fps = decode_video(sample.media, frame_indices=indices, convert=fit, threads=1)
    sampled_fps = fps * len(indices) / total if fps > 0 and total > 0 else 0.0
    still = sample.is_image or len(indices) == 1
    total_frames = 1 if sample.is_image else total
    clip = Clip(sample.key, pixels, still, sampled_fps, tuple(indices), total_frames)
    return clip, max(indices) + 1


def shard_stem(shard: str | Path) -> str:
    """A shard's name without .tar (its sidecar files are named after it)."""
    name = Path(shard).name
    return name[: -len(".tar")] if name.endswith(".tar") else name


def unique_stems(shards: Sequence[str | Path]) -> None:
    """Refuse shards of one name in two folders: their sidecar captions would collide."""
    seen: dict[str, str] = {}
    for shard in shards:
        other = seen.setdefault(shard_stem(shard), str(shard))
        if other != str(shard):
            raise ValueError(f"shards {other} and {shard} share a name; rename one of them")


def own_captions(meta: dict) -> dict[str, str]:
    """A sample's captions as the latent cache reads them (a lone "caption" is "detailed")."""
    return meta.get("captions") or {"detailed": meta["caption"]}


def hint_of(sample: RawSample, field: str, shard: Path) -> str:
    """The sample's own caption under `field`, the captioner's hint; a sample without it is an
    error naming the shard, the key and the fields it has."""
    captions = own_captions(sample.meta)
    if field not in captions:
        raise ValueError(
            f"{shard}: {sample.key} has no {field!r} caption to show as the hint (it has "
            f"{sorted(captions)}): set caption.hint_field to one of those, or null"
        )
    return captions[field]


def check_new_field(captions: dict[str, str], field: str, where: str) -> None:
    """Refuse a field the sample already has: recaptions are added, never overwritten."""
    if field in captions:
        raise ValueError(
            f"{where} already has a {field!r} caption; recaptions are added, never overwritten: "
            "choose another caption.field"
        )


def add_caption(captions: dict[str, str], field: str, text: str, where: str) -> dict[str, str]:
    """`captions` plus `field` (`check_new_field` first)."""
    check_new_field(captions, field, where)
    return {**captions, field: text}


@dataclass
class ShardCounts:
    """What captioning one shard did (summed in the CLI's report)."""

    captioned: int = 0
    failed: int = 0
    frames_read: int = 0
    frames_kept: int = 0
    seconds: float = 0.0


class ShardCaptioner:
    """Captions shards one at a time with a loaded adapter, writing each shard's sidecar files."""

    def __init__(self, adapter: VLMAdapter, config: CaptionConfig, identity: dict) -> None:
        self.adapter, self.config, self.identity = adapter, config, identity

    def caption_shard(self, shard: Path, out: Path) -> ShardCounts:
        """Caption every readable sample of `shard` into out/<stem>.jsonl, then its done record."""
        start, counts = time.perf_counter(), ShardCounts()
        stats = BadSampleCounter()
        lines: list[str] = []
        pending: list[Clip] = []
        for sample in iter_shard_samples([shard], stats=stats):
            check_new_field(own_captions(sample.meta), self.config.field, f"{shard}: {sample.key}")
            ends = bool(getattr(self.adapter, "sample_ends", False))
            try:
                clip, read = read_clip(
                    sample, self.config.frames, self.config.size, self.adapter.multiple, ends
                )
            except (MediaError, ValueError) as error:
                log.warning("not captioning %s in %s: %s", sample.key, shard, error)
                counts.failed += 1
                continue
            if self.config.hint_field:
                clip.hint = hint_of(sample, self.config.hint_field, shard)
            counts.frames_read += read
            counts.frames_kept += len(clip.frames)
            pending.append(clip)
            if len(pending) >= self.config.batch_size:
                lines += self._generate(pending)
                pending = []
        lines += self._generate(pending) if pending else []
        counts.captioned, counts.seconds = len(lines), time.perf_counter() - start
        self._write(shard, out, lines, counts, dict(stats.counts))
        return counts

    def _generate(self, clips: list[Clip]) -> list[str]:
        texts = self.adapter.caption(clips, self.config.instruction, self.config.max_new_tokens)
        return [
            json.dumps({"key": c.key, "caption": t}) + "\n"
            for c, t in zip(clips, texts, strict=True)
        ]

    def _write(
        self, shard: Path, out: Path, lines: list[str], counts: ShardCounts, skipped: dict
    ) -> None:
        """Captions first, then the done record naming their hash: a record means complete."""
        captions = out / f"{shard_stem(shard)}.jsonl"
        write_text_atomic(captions, "".join(lines))
        record = {
            "shard": str(shard),
            "shard_sha256": file_sha256(shard),
            "captions": captions.name,
            "captions_sha256": file_sha256(captions),
            "identity": self.identity,
            "dtype": str(self.adapter.dtype).removeprefix("torch."),
            "skipped": skipped,
            **asdict(counts),
        }
        write_json_atomic(out / f"{shard_stem(shard)}.done.json", record)


def done_record(shard: Path, out: Path, identity: dict) -> dict | None:
    """The shard's done record when it verifies (same captioner, shard and captions bytes)."""
    path = out / f"{shard_stem(shard)}.done.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    captions = out / record.get("captions", "")
    if (
        record.get("identity") != identity
        or not captions.is_file()
        or record.get("captions_sha256") != file_sha256(captions)
        or record.get("shard_sha256") != file_sha256(shard)
    ):
        return None
    return record


def caption_shards(
    shards: Sequence[Path],
    out: Path,
    config: CaptionConfig,
    identity: dict,
    adapter: VLMAdapter | None = None,
) -> dict[str, Any]:
    """Caption every shard whose done record does not verify; returns counts for the report.
    `adapter`: an already loaded captioner (the world's, trained by the step), else the VLM's."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in shards if done_record(s, out, identity) is None]
    report: dict[str, Any] = {"shards": len(shards), "already_done": len(shards) - len(todo)}
    if not todo:
        return report
    if adapter is None:
        adapter = load_adapter(str(config.model), dtype=config.dtype, device=config.device)
    captioner = ShardCaptioner(adapter, config, identity)
    total = ShardCounts()
    for shard in todo:
        counts = captioner.caption_shard(shard, out)
        for name, value in asdict(counts).items():
            setattr(total, name, getattr(total, name) + value)
        log.info("captioned %s: %d clips in %.1f s", shard.name, counts.captioned, counts.seconds)
    clips_per_s = total.captioned / total.seconds if total.seconds else 0.0
    per_clip = total.frames_read / max(total.captioned + total.failed, 1)
    report.update(asdict(total), clips_per_s=clips_per_s, frames_read_per_clip=per_clip)
    return report


def write_meta(shards: Sequence[Path], out: Path, identity: dict) -> dict[str, Any]:
    """meta.json once every shard's captions verify; refuses naming the shards still missing."""
    records = {shard: done_record(shard, out, identity) for shard in shards}
    missing = [str(shard) for shard, record in records.items() if record is None]
    if missing:
        raise FileNotFoundError(
            f"{out}: no verified captions for {len(missing)} shards (first: {missing[:3]}); "
            "rerun the caption command (finished shards are skipped)"
        )
    entries = [
        {k: r[k] for k in ("shard", "captions", "captions_sha256", "captioned", "failed")}
        for r in records.values()
        if r is not None
    ]
    meta = {
        "identity": identity,
        "source": source_hash(identity),
        "field": identity["field"],
        "shards": entries,
        "num_captioned": sum(e["captioned"] for e in entries),
        "num_failed": sum(e["failed"] for e in entries),
    }
    write_json_atomic(out / META_NAME, meta)
    return meta


@dataclass
class AddedCaptions:
    """A finished captions folder as the latent cache reads it: key -> caption, per shard."""

    directory: Path
    meta: dict

    @classmethod
    def load(cls, directory: str | Path) -> AddedCaptions:
        path = Path(directory) / META_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the caption step (or its --merge)")
        return cls(Path(directory), json.loads(path.read_text(encoding="utf-8")))

    @property
    def field(self) -> str:
        return str(self.meta["field"])

    @property
    def source(self) -> str:
        """The captioner's identity hash; part of the latent cache key."""
        return str(self.meta["source"])

    def for_shard(self, shard: str | Path) -> dict[str, str]:
        """key -> added caption of one shard; a shard the folder does not cover is an error."""
        stem = shard_stem(shard)
        entry = next((e for e in self.meta["shards"] if shard_stem(e["shard"]) == stem), None)
        if entry is None:
            raise FileNotFoundError(
                f"{self.directory} has no captions for shard {shard}: rerun the caption step"
            )
        lines = (self.directory / entry["captions"]).read_text(encoding="utf-8").splitlines()
        return {row["key"]: row["caption"] for row in map(json.loads, lines) if row["caption"]}


def find_shards(patterns: Sequence[str]) -> list[Path]:
    """Shards matching the globs, sorted and deduplicated (the order parts are split in)."""
    found = sorted({Path(p).resolve() for pattern in patterns for p in glob.glob(pattern)})
    if not found:
        raise FileNotFoundError(f"no shard matches {list(patterns)}")
    unique_stems(found)
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", nargs="+", required=True, help="globs of webdataset .tar")
    parser.add_argument("--output", type=Path, required=True, help="folder for the captions")
    parser.add_argument(
        "--model",
        required=True,
        help="local VLM folder (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision), or world (trained here)",
    )
    defaults = CaptionConfig()
    for name in ("field", "instruction", "frames", "size", "batch_size", "dtype", "device"):
        value = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--hint-field", help="a caption field shown to the captioner as {hint}")
    parser.add_argument("--num-parts", type=int, help="job array: split shards into this many")
    parser.add_argument("--part", type=int, help="this task's part (default $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--merge", action="store_true", help="after an array: write meta.json")
    return parser


def _world(
    shards: Sequence[Path], out: Path, config: CaptionConfig, num_parts: int | None
) -> tuple[VLMAdapter, dict]:
    """`--model world`: the captioner trained on every shard's labelled clips (OUT/world_model/,
    reused while its record names the same shards), and its identity. Array parts would each
    train their own, so they need it trained first by one run without --num-parts."""
    folder = out / "world_model"
    if num_parts is not None and not (folder / world_captioner.RECORD).is_file():
        raise ValueError(
            f"--model world with --num-parts needs {folder} trained first: run the caption "
            "command once without --num-parts (it trains, then captions)"
        )

    def read(sample: RawSample) -> Clip:
        return read_clip(sample, config.frames, config.size, 1, ends=True)[0]

    captioner = world_captioner.train_or_load(shards, folder, read, config.frames, config.size)
    identity = world_captioner.world_identity(
        captioner, config.field, config.instruction, config.frames
    )
    return captioner, {**identity, **hint_identity(config)}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sora_lightning.data.captioning --shards GLOB --output DIR --model DIR`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    fields = set(CaptionConfig.__dataclass_fields__) - {"enabled", "model"}
    config = CaptionConfig(model=args.model, **{k: getattr(args, k) for k in fields})
    shards = find_shards(args.shards)
    adapter: VLMAdapter | None = None
    if config.model == world_captioner.MODEL_NAME:
        adapter, identity = _world(shards, args.output, config, args.num_parts)
    else:
        identity = caption_identity(config)
    if args.merge:
        meta = write_meta(shards, args.output, identity)
        print(json.dumps({k: meta[k] for k in ("source", "field", "num_captioned")}, indent=2))
        return 0
    part = resolve_part(args.num_parts, args.part, names=("--num-parts", "--part"))
    mine = select_part(shards, args.num_parts, part) if part is not None else shards
    report = caption_shards(mine, args.output, config, identity, adapter)
    if part is None:
        report["source"] = write_meta(shards, args.output, identity)["source"]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
