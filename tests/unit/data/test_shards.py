"""run_shard with more shards than inputs: the empty shard's part is written for it."""

from __future__ import annotations

from visiontune.data.shards import Shard, marker_path, merge_csv_shards, run_shard


def test_a_shard_without_inputs_gets_an_empty_marked_part_and_the_merge_finds_every_shard(tmp_path):
    out = tmp_path / "preds.csv"
    called = []

    def write_part(paths, part):
        called.append(list(paths))
        part.write_text("path\n" + "".join(f"{p}\n" for p in paths))

    runs = [run_shard(out, ["a.png", "b.png"], Shard(k, 3), write_part) for k in (1, 2, 3)]
    assert called == [["a.png"], ["b.png"]]  # shard 1 of 3 takes none of the two inputs
    empty = runs[0].part
    assert empty.read_bytes() == b"" and marker_path(empty).is_file() and runs[0].inputs == 0
    assert run_shard(out, ["a.png", "b.png"], Shard(1, 3), write_part).skipped_existing
    assert merge_csv_shards(out)["rows"] == 2 and out.read_text() == "path\na.png\nb.png\n"
