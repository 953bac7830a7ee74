"""kpnb.data.shard_io: the done-records, temporaries and format tags shared by kpnb data pack and kpnb data filter."""
import json

import pytest

from kpnb.data import shard_io, shards
from kpnb.data import stream_filter as sf
from kpnb.data.folder import DataError


def _done(folder, name, payload, record):
    (folder / f"{name}{payload}").write_bytes(b"x" * record["bytes"])
    (folder / f"{name}.json").write_text(json.dumps(record))


def test_names_formats_and_delay_are_the_ones_on_disk(monkeypatch):
    assert shards.shard_name(3) == "shard-000003" and sf.result_name(12) == "filter-000012"
    assert (shards.FORMAT, sf.FORMAT) == ("kpnb-shards/1", "kpnb-filter/1")
    assert (shards.DELAY_ENV, sf.DELAY_ENV) == ("KPNB_PACK_DELAY_S", "KPNB_FILTER_DELAY_S")
    monkeypatch.delenv(shards.DELAY_ENV, raising=False)
    monkeypatch.setenv(sf.DELAY_ENV, "")
    assert shard_io.PACK.delay() == 0.0 and shard_io.FILTER.delay() == 0.0
    monkeypatch.setenv(sf.DELAY_ENV, "0.25")
    assert shard_io.FILTER.delay() == 0.25


def test_done_record_needs_the_expected_values_and_the_payload_size(tmp_path):
    files = shard_io.PACK
    _done(tmp_path, "shard-000000", ".tar", {"bytes": 5, "settings": {"size": 32}, "ids_sha1": "a"})
    want = {"settings": {"size": 32}, "ids_sha1": "a"}
    assert files.done_record(tmp_path, 0, want)["bytes"] == 5
    assert files.done_record(tmp_path, 0, {**want, "ids_sha1": "b"}) is None     # other ids
    assert files.done_record(tmp_path, 0, {"format": "kpnb-shards/1"}) is None   # a value the record lacks
    assert files.done_record(tmp_path, 1, want) is None                          # no record
    (tmp_path / "shard-000000.tar").write_bytes(b"xxxx")                         # payload cut short
    assert files.done_record(tmp_path, 0, want) is None
    (tmp_path / "shard-000000.tar").unlink()                                     # payload gone
    assert files.done_record(tmp_path, 0, want) is None
    _done(tmp_path, "shard-000002", ".tar", {"bytes": 1})
    (tmp_path / "shard-000002.json").write_text("{")                             # half a record
    assert files.done_record(tmp_path, 2, {}) is None
    (tmp_path / "shard-000002.json").write_text("[1]")                           # not a record
    assert files.done_record(tmp_path, 2, {}) is None


def test_remove_temps_of_this_job_and_of_the_indices_owned(tmp_path):
    names = [".filter-000000.jsonl.a1.tmp", ".filter-000001.json.b2.tmp", ".filter-000002.jsonl.c3.tmp",
             ".shard-000001.json.d4.tmp", "filter-000001.jsonl", ".filter-000003.jsonl.e5"]
    for n in names:
        (tmp_path / n).write_text("x")
    gone = shard_io.FILTER.remove_temps(tmp_path, owns=lambda i: i % 2 == 0)
    assert gone == [".filter-000000.jsonl.a1.tmp", ".filter-000002.jsonl.c3.tmp"]
    assert shard_io.FILTER.remove_temps(tmp_path) == [".filter-000001.json.b2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".filter-000003.jsonl.e5", ".shard-000001.json.d4.tmp",
                                                          "filter-000001.jsonl"]


def test_read_format_json_names_the_file_and_what_is_wrong(tmp_path):
    path = tmp_path / "m.json"
    with pytest.raises(DataError, match=r"m\.json: pack first"):
        shard_io.read_format_json(path, "kpnb-shards/1", "pack first")
    path.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        shard_io.read_format_json(path, "kpnb-shards/1", "pack first")
    path.write_text(json.dumps({"format": "kpnb-filter/1"}))
    with pytest.raises(DataError, match="'kpnb-filter/1', expected 'kpnb-shards/1'"):
        shard_io.read_format_json(path, "kpnb-shards/1", "pack first")
    assert shard_io.read_format_json(path, "kpnb-filter/1", "")["format"] == "kpnb-filter/1"
