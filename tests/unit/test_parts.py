"""The parts-and-merge protocol of array steps (ingest, latent cache) in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sora_lightning.data import ingest
from sora_lightning.data.parts import (
    ARRAY_TASK_ENV,
    PartRecord,
    check_parts,
    read_part_records,
    resolve_part,
    select_part,
)
from sora_lightning.train.cache import _part
from sora_lightning.utils import write_json_atomic


def test_parts_cover_every_input_once_in_order() -> None:
    items = list("abcdefg")
    parts = [select_part(items, 3, part) for part in range(3)]
    assert parts == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert select_part(items, None, 0) == items
    assert select_part(items[:2], 4, 3) == []  # more parts than inputs: an empty part
    with pytest.raises(ValueError, match="0 <= part < num_parts"):
        select_part(items, 3, 3)


def test_part_is_given_or_read_from_the_array_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ARRAY_TASK_ENV, raising=False)
    assert resolve_part(None, None) is None
    assert resolve_part(4, 2) == 2
    with pytest.raises(ValueError, match="num_parts=4 needs 0 <= part < 4"):
        resolve_part(4, None)
    with pytest.raises(ValueError, match="--part=1 needs --num-parts"):
        resolve_part(None, 1, names=("--num-parts", "--part"))
    monkeypatch.setenv(ARRAY_TASK_ENV, "3")
    assert resolve_part(4, None) == 3 and resolve_part(4, 1) == 1  # explicit wins
    with pytest.raises(ValueError, match="cache.num_parts=2 needs 0 <= cache.part < 2"):
        resolve_part(2, None, names=("cache.num_parts", "cache.part"))


def test_both_clis_read_parts_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ARRAY_TASK_ENV, "1")
    parser = ingest.build_parser()
    args = parser.parse_args(["--world-clips", "1", "--output", "x", "--num-parts", "2"])
    assert ingest._parts(args, parser) == {"num_parts": 2, "part": 1}
    assert _part(OmegaConf.create({"cache": {"num_parts": 2, "part": None}})) == 1
    assert _part(OmegaConf.create({"cache": {"num_parts": None, "part": None}})) is None
    args = parser.parse_args(["--world-clips", "1", "--output", "x", "--part", "0"])
    with pytest.raises(SystemExit):
        ingest._parts(args, parser)


def _record(tmp_path: Path, part: int, num_parts: int = 3, **request) -> PartRecord:
    name = f"out-{part}.bin"
    (tmp_path / name).write_bytes(b"x")
    return PartRecord(tmp_path / f"p{part}.json", part, num_parts, {"seed": 0, **request}, (name,))


def test_merge_accepts_only_complete_parts_of_one_request(tmp_path: Path) -> None:
    records = [_record(tmp_path, part) for part in range(3)]
    check_parts(tmp_path, records)
    with pytest.raises(
        FileNotFoundError, match=r"missing parts \[1\].*rerun the --part tasks \[1\]"
    ):
        check_parts(tmp_path, [records[0], records[2]])
    with pytest.raises(ValueError, match=r"differ in \['seed'\]"):
        check_parts(tmp_path, [*records[:2], _record(tmp_path, 2, seed=1)])
    (tmp_path / "out-1.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: \['out-1.bin'\]"):
        check_parts(tmp_path, records)


def test_part_records_are_read_in_part_order(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the --part tasks first"):
        read_part_records(tmp_path, "meta.part-*.json")
    for part in (2, 0, 1):
        write_json_atomic(tmp_path / f"meta.part-{part:03d}.json", {"part": part})
    found = read_part_records(tmp_path, "meta.part-*.json")
    assert [record["part"] for _, record in found] == [0, 1, 2]
