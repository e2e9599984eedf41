"""Streaming readers: real samples, malformed input, generic csv / parquet, and splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrserve.models.readers import (
    MalformedRowError,
    ReadStats,
    avazu_spec,
    count_rows,
    criteo_spec,
    iter_batches,
    iter_split,
    libfm_spec,
    part_sizes,
    row_hash,
    sniff_format,
    spec_for,
    split_mask,
)
from ctrserve.models.schema import CategoricalColumn, DatasetSpec, LabelRule, RawBatch

_AVAZU_HEADER = avazu_spec().categorical_names
CRITEO = "criteo/criteo_kaggle_8k.tsv"
CRITEO_TEST = "criteo/criteo_kaggle_test_unlabeled_2k.tsv"
AVAZU = "avazu/avazu_9k.csv"
FRAPPE_VALID = "frappe/frappe.validation.libfm"
FRAPPE_TEST = "frappe/frappe.test.libfm"


def _sample(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _concat(batches: list[RawBatch]) -> RawBatch:
    first = batches[0]
    return RawBatch(
        labels=None if first.labels is None else np.concatenate([b.labels for b in batches]),
        dense={k: np.concatenate([b.dense[k] for b in batches]) for k in first.dense},
        categorical={
            k: np.concatenate([b.categorical[k] for b in batches]) for k in first.categorical
        },
    )


def _read(path: Path, spec: DatasetSpec, batch_rows: int = 65536, **kwargs) -> RawBatch:
    return _concat(list(iter_batches(path, spec, batch_rows, **kwargs)))


def _assert_same(a: RawBatch, b: RawBatch) -> None:
    if a.labels is None:
        assert b.labels is None
    else:
        np.testing.assert_array_equal(a.labels, b.labels)
    assert a.dense.keys() == b.dense.keys() and a.categorical.keys() == b.categorical.keys()
    for name in a.dense:
        np.testing.assert_array_equal(a.dense[name], b.dense[name])  # NaN == NaN here
    for name in a.categorical:
        assert a.categorical[name].dtype == b.categorical[name].dtype
        assert a.categorical[name].tolist() == b.categorical[name].tolist()


# --------------------------------------------------------------------------- real samples


def test_criteo_sample(shared_data: Path) -> None:
    path = _sample(shared_data, CRITEO)
    spec = spec_for(path, "criteo")
    assert spec == criteo_spec()
    batch = _read(path, spec)

    assert len(batch) == 8184 == count_rows(path, spec)
    assert batch.labels.dtype == np.float32
    assert set(np.unique(batch.labels)) == {0.0, 1.0}
    assert batch.labels.mean() == pytest.approx(0.2165, abs=0.001)
    assert list(batch.dense) == [f"I{i}" for i in range(1, 14)]
    assert all(values.dtype == np.float64 for values in batch.dense.values())
    assert np.isnan(batch.dense["I12"]).mean() > 0.5  # I12 is mostly empty in Criteo
    assert (batch.dense["I2"] < 0).any()  # raw values, negatives kept
    assert batch.dense["I1"][0] == 1.0 and batch.dense["I5"][0] == 1382.0
    c1 = batch.categorical["C1"]
    assert c1.dtype == object and c1[0] == "68fd1e64"
    c22 = batch.categorical["C22"]
    assert any(value is None for value in c22)  # empty fields are missing
    present = [value for value in c22 if value is not None]
    assert present and all(len(value) == 8 for value in present)


def test_criteo_unlabeled_sample(shared_data: Path) -> None:
    path = _sample(shared_data, CRITEO_TEST)
    spec = spec_for(path, "criteo")
    assert spec.label is None
    assert spec.column_names == criteo_spec().column_names
    batch = _read(path, spec)
    assert len(batch) == 1999 == count_rows(path, spec)
    assert batch.labels is None
    assert len(batch.dense) == 13 and len(batch.categorical) == 26


def test_avazu_sample(shared_data: Path) -> None:
    path = _sample(shared_data, AVAZU)
    spec = spec_for(path, "avazu")
    assert spec == avazu_spec()
    batch = _read(path, spec)
    assert len(batch) == 8999 == count_rows(path, spec)
    assert batch.labels.mean() == pytest.approx(0.1737, abs=0.001)
    assert batch.dense == {}
    assert "id" not in batch.categorical and len(batch.categorical) == 22
    assert batch.categorical["hour"][0] == "14102100"
    assert batch.categorical["site_id"][0] == "1fbe01fe"
    assert all(isinstance(value, str) for value in batch.categorical["device_ip"])


@pytest.mark.parametrize(("name", "rows"), [(FRAPPE_VALID, 57722), (FRAPPE_TEST, 28860)])
def test_frappe_sample(shared_data: Path, name: str, rows: int) -> None:
    path = _sample(shared_data, name)
    spec = spec_for(path, "libfm")
    assert spec == libfm_spec(10)
    batch = _read(path, spec)
    assert len(batch) == rows == count_rows(path, spec)
    assert set(np.unique(batch.labels)) == {0.0, 1.0}  # -1/1 in the file
    assert batch.labels.mean() == pytest.approx(1 / 3, abs=0.005)
    assert list(batch.categorical) == [f"f{k}" for k in range(1, 11)]
    for values in batch.categorical.values():
        assert values.dtype == np.int64
    # One-hot fields are numbered one after another: the user field comes before the item field.
    assert batch.categorical["f1"].max() < batch.categorical["f2"].min()


@pytest.mark.parametrize(
    ("name", "fmt"), [(CRITEO, "criteo"), (AVAZU, "avazu"), (FRAPPE_TEST, "libfm")]
)
def test_batch_rows_do_not_change_the_data(shared_data: Path, name: str, fmt: str) -> None:
    path = _sample(shared_data, name)
    spec = spec_for(path, fmt)
    batches = list(iter_batches(path, spec, batch_rows=1000))
    assert [len(b) for b in batches[:-1]] == [1000] * (len(batches) - 1)
    assert 0 < len(batches[-1]) <= 1000
    _assert_same(_concat(batches), _read(path, spec, batch_rows=1_000_000))


# --------------------------------------------------------------------------- malformed input


def _criteo_line(row_id: int, label: str = "0", i5: str = "5") -> str:
    """A Criteo line whose I1 is ``row_id``; C1 is its hex."""
    dense = [str(row_id), "-1", "", "7", i5, *["1"] * 8]
    categorical = [f"{row_id:08x}", "", *["a1b2c3d4"] * 24]
    return "\t".join([label, *dense, *categorical])


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _row_ids(batch: RawBatch) -> list[int]:
    return batch.dense["I1"].astype(int).tolist()


def _raises_at(path: Path, spec: DatasetSpec, line: int, batch_rows: int = 65536) -> str:
    with pytest.raises(MalformedRowError) as caught:
        list(iter_batches(path, spec, batch_rows))
    assert caught.value.line == line
    message = str(caught.value)
    assert str(path) in message and f"line {line}:" in message
    return message


def test_wrong_field_count(tmp_path: Path) -> None:
    lines = [_criteo_line(k) for k in range(1, 7)]
    lines[3] = lines[3].rsplit("\t", 1)[0]  # line 4 loses a field
    path = _write_lines(tmp_path / "short.tsv", lines)

    assert "expected 40 fields, found 39" in _raises_at(path, criteo_spec(), 4)

    stats = ReadStats()
    batch = _read(path, criteo_spec(), on_error="skip", stats=stats)
    assert _row_ids(batch) == [1, 2, 3, 5, 6]
    assert batch.categorical["C1"].tolist() == [f"{k:08x}" for k in (1, 2, 3, 5, 6)]
    assert stats == ReadStats(rows_read=5, rows_skipped=1, first_skipped_lines=[4])


def test_bad_number(tmp_path: Path) -> None:
    lines = [_criteo_line(k) for k in range(1, 6)]
    lines[2] = _criteo_line(3, i5="12x")
    path = _write_lines(tmp_path / "bad_number.tsv", lines)

    assert "'I5': '12x'" in _raises_at(path, criteo_spec(), 3)

    stats = ReadStats()
    batch = _read(path, criteo_spec(), on_error="skip", stats=stats)
    assert _row_ids(batch) == [1, 2, 4, 5]
    assert batch.dense["I5"].tolist() == [5.0] * 4
    assert stats.rows_skipped == 1 and stats.first_skipped_lines == [3]


@pytest.mark.parametrize(
    ("label", "reason"), [("2", "-1, 0 or 1"), ("", "missing label"), ("y", "not a number")]
)
def test_bad_label(tmp_path: Path, label: str, reason: str) -> None:
    lines = [_criteo_line(1, "1"), _criteo_line(2, label), _criteo_line(3, "0")]
    path = _write_lines(tmp_path / "bad_label.tsv", lines)
    assert reason in _raises_at(path, criteo_spec(), 2)
    batch = _read(path, criteo_spec(), on_error="skip")
    assert _row_ids(batch) == [1, 3] and batch.labels.tolist() == [1.0, 0.0]


def test_header_line_is_counted(tmp_path: Path) -> None:
    header = "id,click," + ",".join(avazu_spec().categorical_names)
    row = ",".join(["1"] * 22)
    lines = [header, f"10000169349117863715,0,{row}", f"2,x,{row}", f"3,1,{row}"]
    path = _write_lines(tmp_path / "avazu.csv", lines)
    assert "'click': 'x'" in _raises_at(path, avazu_spec(), 3)


def test_libfm_bad_token(tmp_path: Path) -> None:
    lines = ["1 3:1 7:1", "-1 4:1 x:1", "1 5:1 9", "0 2:1 8:1", "1 6:1 1:2:3", "-1 1:1 9:0.5"]
    path = _write_lines(tmp_path / "bad.libfm", lines)
    spec = spec_for(path, "libfm")
    assert spec == libfm_spec(2)

    assert "not an idx:val pair in column 'f2': 'x:1'" in _raises_at(path, spec, 2)

    stats = ReadStats()
    batch = _read(path, spec, on_error="skip", stats=stats)
    assert batch.categorical["f1"].tolist() == [3, 2, 1]
    assert batch.categorical["f2"].tolist() == [7, 8, 9]
    assert batch.labels.tolist() == [1.0, 0.0, 0.0]
    assert stats == ReadStats(rows_read=3, rows_skipped=3, first_skipped_lines=[2, 3, 5])


def test_line_numbers_across_chunks_and_blank_lines(tmp_path: Path) -> None:
    """Rows are mapped to lines past rejected lines, blank lines and chunk boundaries."""
    lines = [_criteo_line(k) for k in range(1, 61)]
    lines[6] = "0\t1\t2"  # line 7: wrong field count
    lines[11] = ""  # line 12: blank, ignored
    lines[22] = _criteo_line(23, i5="nan?")  # line 23: bad number
    lines[40] = _criteo_line(41, label="7")  # line 41: label outside the rule
    path = _write_lines(tmp_path / "mixed.tsv", lines)

    stats = ReadStats()
    batches = list(iter_batches(path, criteo_spec(), batch_rows=5, on_error="skip", stats=stats))
    assert all(len(b) <= 5 for b in batches)
    kept = [k for k in range(1, 61) if k not in (7, 12, 23, 41)]
    assert _row_ids(_concat(batches)) == kept
    assert stats == ReadStats(rows_read=56, rows_skipped=3, first_skipped_lines=[7, 23, 41])
    assert count_rows(path, criteo_spec()) == 58  # blank and short lines are not rows

    _raises_at(path, criteo_spec(), 7, batch_rows=5)
    lines[6] = _criteo_line(7)
    _write_lines(path, lines)
    for batch_rows in (5, 1000):
        _raises_at(path, criteo_spec(), 23, batch_rows=batch_rows)


def test_line_numbers_across_parser_blocks(tmp_path: Path) -> None:
    """A file of several parser blocks (2 MiB) still reports exact lines."""
    spec = DatasetSpec(label=LabelRule("y"), dense=("x",), format="csv", header=True)
    path = tmp_path / "long.csv"
    rows = 600_000
    with path.open("w") as file:
        file.write("y,x\n")
        for line in range(2, rows + 2):
            if line == 300_001:
                file.write("1,2,3\n")
            elif line == 500_001:
                file.write("0,oops\n")
            else:
                file.write(f"{line % 2},{line}\n")
    assert path.stat().st_size > 2 * (2 << 20)  # three blocks or more

    stats = ReadStats()
    batch = _read(path, spec, on_error="skip", stats=stats)
    assert stats.first_skipped_lines == [300_001, 500_001]
    assert len(batch) == rows - 2
    lines = batch.dense["x"]
    assert lines[0] == 2 and lines[-1] == rows + 1 and 300_001 not in lines
    _raises_at(path, spec, 300_001)


def test_skipped_lines_are_capped(tmp_path: Path) -> None:
    lines = [_criteo_line(k, label="5" if k % 2 else "0") for k in range(1, 41)]
    path = _write_lines(tmp_path / "many_bad.tsv", lines)
    stats = ReadStats()
    batch = _read(path, criteo_spec(), batch_rows=7, on_error="skip", stats=stats)
    assert len(batch) == 20 and stats.rows_skipped == 20
    assert stats.first_skipped_lines == list(range(1, 21, 2))


# --------------------------------------------------------------------------- generic csv, parquet


def test_generic_csv_with_spec_and_threshold(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "ratings.csv",
        [
            "user,item,rating,price,note",
            '17,"Dune, Part Two",5,12.5,great',
            "17,Alien,3,,meh",
            '4,"",4,-1e2,',
            "4,Heat,1,7,NA",
        ],
    )
    spec = DatasetSpec(
        label=LabelRule("rating", threshold=4.0),
        dense=("price",),
        categorical=(CategoricalColumn("user", "int"), CategoricalColumn("item", "string")),
        ignore=("note",),
    )
    spec_path = tmp_path / "spec.json"
    spec.save(spec_path)
    with pytest.raises(ValueError, match="needs a column spec: pass --spec"):
        spec_for(path, "csv")
    assert spec_for(path, "csv", spec_path) == spec

    batch = _read(path, spec_for(path, "csv", spec_path))
    assert batch.labels.tolist() == [1.0, 0.0, 1.0, 0.0]
    np.testing.assert_array_equal(batch.dense["price"], [12.5, np.nan, -100.0, 7.0])
    assert batch.categorical["user"].dtype == np.int64
    assert batch.categorical["user"].tolist() == [17, 17, 4, 4]
    assert batch.categorical["item"].tolist() == ["Dune, Part Two", "Alien", None, "Heat"]
    assert count_rows(path, spec) == 4


def test_parquet_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    table = pa.table(
        {
            "click": pa.array([0, 1, 1, 0, 1], pa.int64()),
            "price": pa.array([1.5, None, 3.0, -2.0, 0.0]),
            "user": pa.array([10, 11, 12, 13, 14], pa.int64()),
            "city": pa.array(["paris", None, "", "rome", "oslo"]),
            "unused": pa.array(["a"] * 5),
        }
    )
    pq.write_table(table, path, row_group_size=2)
    spec = DatasetSpec(
        label=LabelRule("click"),
        dense=("price",),
        categorical=(CategoricalColumn("user", "int"), CategoricalColumn("city", "string")),
        format="parquet",
    )
    assert count_rows(path, spec) == 5
    batches = list(iter_batches(path, spec, batch_rows=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    batch = _concat(batches)
    assert batch.labels.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    np.testing.assert_array_equal(batch.dense["price"], [1.5, np.nan, 3.0, -2.0, 0.0])
    assert batch.categorical["user"].dtype == np.int64
    assert batch.categorical["user"].tolist() == [10, 11, 12, 13, 14]
    assert batch.categorical["city"].tolist() == ["paris", None, None, "rome", "oslo"]
    _assert_same(batch, _read(path, spec))


def test_parquet_missing_label(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"click": [1, 0, None, 1], "user": [1, 2, 3, 4]}), path)
    spec = DatasetSpec(
        label=LabelRule("click"), categorical=(CategoricalColumn("user", "int"),), format="parquet"
    )
    with pytest.raises(MalformedRowError, match=r"row 3: missing label") as caught:
        list(iter_batches(path, spec))
    assert caught.value.line == 3
    stats = ReadStats()
    assert _read(path, spec, on_error="skip", stats=stats).categorical["user"].tolist() == [1, 2, 4]
    assert stats.first_skipped_lines == [3]


# --------------------------------------------------------------------------- formats


def _libfm_lines(rows: int, fields: int, largest: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [f"{k % 2} " + " ".join(f"{i}:1" for i in sorted(rng.integers(0, largest, fields)))
            for k in range(rows)]


def test_formats_are_told_by_content_whatever_the_extension(tmp_path: Path) -> None:
    libfm = _write_lines(tmp_path / "ads.txt", _libfm_lines(20, 16, 133_000))
    criteo = _write_lines(tmp_path / "log.txt",
                          ["1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["68fd1e64"] * 26)])
    avazu = _write_lines(tmp_path / "a.csv", ["id,click," + ",".join(_AVAZU_HEADER), "1,0," +
                                              ",".join(["5"] * len(_AVAZU_HEADER))])
    ratings = _write_lines(tmp_path / "ratings.tsv", ["user\titem\trating", "1\t2\t5"])
    parquet = tmp_path / "t.data"
    pq.write_table(pa.table({"x": [1]}), parquet)
    assert sniff_format(libfm) == ("libfm", "a label and 16 idx:val tokens a line")
    assert sniff_format(criteo)[0] == "criteo"
    assert sniff_format(avazu)[0] == "avazu"
    assert sniff_format(ratings)[0] == "csv"
    assert sniff_format(parquet)[0] == "parquet"
    spec = spec_for(libfm, "libfm")
    assert len(spec.categorical) == 16
    assert _read(libfm, spec).categorical["f16"].max() < 133_000


@pytest.mark.parametrize(("wrong", "said"), [
    ("criteo", "a criteo line has 39 or 40 tab-separated fields, the first has 1"),
    ("avazu", "an avazu header names"),
])
def test_a_wrong_format_says_which_one_to_pass(tmp_path: Path, wrong: str, said: str) -> None:
    libfm = _write_lines(tmp_path / "ads.txt", _libfm_lines(5, 16, 133_000))
    with pytest.raises(ValueError, match=said) as raised:
        spec_for(libfm, wrong)
    assert str(raised.value).endswith("; it looks like libfm (a label and 16 idx:val tokens a "
                                      "line): pass --format libfm")


def test_libfm_asked_of_a_criteo_file_says_criteo(tmp_path: Path) -> None:
    criteo = _write_lines(tmp_path / "log.txt",
                          ["1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["68fd1e64"] * 26)])
    with pytest.raises(ValueError, match=r"idx:val tokens; it looks like criteo .*format criteo"):
        spec_for(criteo, "libfm")


# --------------------------------------------------------------------------- splits

_M64 = (1 << 64) - 1


def _splitmix_hash(row: int, seed: int) -> int:
    """Reference: the documented hash in plain Python integers."""

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)

    return mix((row * 0x9E3779B97F4A7C15 + mix(seed & _M64)) & _M64) >> 1


def _parts(start: int, n: int, total: int, mode: str, fractions, seed: int = 0):
    return [split_mask(start, n, total, mode, fractions, p, seed) for p in range(len(fractions))]


@pytest.mark.parametrize("mode", ["position", "random"])
@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.8, 0.2), (0.9, 0.1), (1.0,),
                                       (0.0, 0.5, 0.5)])
@pytest.mark.parametrize("n", [1, 10, 8999, 100_000])
def test_split_parts_partition_rows_exactly(mode: str, fractions, n: int) -> None:
    masks = _parts(0, n, n, mode, fractions, seed=3)
    np.testing.assert_array_equal(np.sum(masks, axis=0), np.ones(n))
    sizes = np.diff([0, *part_sizes(n, fractions), n])
    assert [int(mask.sum()) for mask in masks] == sizes.tolist()
    assert all(abs(size - fraction * n) <= 0.5 for size, fraction in zip(sizes, fractions,
                                                                          strict=True))


def test_position_split_is_contiguous() -> None:
    masks = _parts(0, 1000, 1000, "position", (0.8, 0.1, 0.1))
    assert [np.flatnonzero(m).tolist() for m in masks] == [
        list(range(800)),
        list(range(800, 900)),
        list(range(900, 1000)),
    ]
    # Rows past total_rows (a count that was too small) stay in the last part.
    assert split_mask(1000, 5, 1000, "position", (0.8, 0.2), 1, 0).all()


@pytest.mark.parametrize("mode", ["position", "random"])
def test_split_does_not_depend_on_chunking(mode: str) -> None:
    whole = split_mask(0, 1000, 1000, mode, (0.7, 0.3), 0, seed=9)
    cuts = ((0, 337), (337, 1000))
    pieces = [split_mask(s, e - s, 1000, mode, (0.7, 0.3), 0, seed=9) for s, e in cuts]
    np.testing.assert_array_equal(whole, np.concatenate(pieces))


def test_random_split_ranks_rows_by_their_seeded_hash() -> None:
    fractions = (0.5, 0.3, 0.2)
    for seed in (0, 1, 12345, -1):
        hashes = [_splitmix_hash(row, seed) for row in range(200)]
        assert row_hash(np.arange(200), seed).tolist() == hashes
        ranks = np.argsort(np.argsort(hashes))
        expected = np.searchsorted([100, 160], ranks, side="right")
        masks = _parts(0, 200, 200, "random", fractions, seed)
        np.testing.assert_array_equal(np.argmax(masks, axis=0), expected)
    same = split_mask(0, 1000, 1000, "random", fractions, 0, seed=4)
    np.testing.assert_array_equal(same, split_mask(0, 1000, 1000, "random", fractions, 0, 4))
    assert (same != split_mask(0, 1000, 1000, "random", fractions, 0, 5)).any()


def test_split_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        split_mask(0, 10, 10, "random", (0.8, 0.1), 0, 0)
    with pytest.raises(ValueError, match="part"):
        split_mask(0, 10, 10, "random", (0.8, 0.2), 2, 0)
    with pytest.raises(ValueError, match="mode"):
        split_mask(0, 10, 10, "shuffle", (0.8, 0.2), 0, 0)


@pytest.mark.parametrize("mode", ["position", "random"])
def test_iter_split_partitions_a_file(tmp_path: Path, mode: str) -> None:
    n = 1000
    path = _write_lines(tmp_path / "ids.csv", ["y,row", *(f"{k % 2},{k}" for k in range(n))])
    spec = DatasetSpec(label=LabelRule("y"), dense=("row",))
    fractions = (0.8, 0.1, 0.1)

    def rows(part: int, batch_rows: int) -> list[int]:
        batches = list(iter_split(path, spec, mode, fractions, part, 7, batch_rows=batch_rows))
        assert all(len(b) for b in batches)
        return [int(x) for b in batches for x in b.dense["row"]]

    parts = [rows(part, 64) for part in range(3)]
    assert sorted(row for part in parts for row in part) == list(range(n))
    assert parts == [rows(part, 1000) for part in range(3)]
    if mode == "position":
        assert parts[0] == list(range(800)) and parts[2] == list(range(900, 1000))
    else:
        assert parts[0] != list(range(len(parts[0])))  # shuffled, not a prefix


def test_iter_split_criteo_sample(shared_data: Path) -> None:
    path = _sample(shared_data, CRITEO)
    spec = spec_for(path, "criteo")
    sizes = [
        sum(len(b) for b in iter_split(path, spec, "position", (0.8, 0.1, 0.1), part, 0, 1000))
        for part in range(3)
    ]
    assert sizes == [6547, 819, 818]
    first_valid = next(iter_split(path, spec, "position", (0.8, 0.1, 0.1), 1, 0, total_rows=8184))
    whole = _read(path, spec)
    assert first_valid.categorical["C3"][0] == whole.categorical["C3"][6547]


def test_random_split_of_the_avazu_sample_is_exact(shared_data: Path) -> None:
    path = _sample(shared_data, AVAZU)
    spec = spec_for(path, "avazu")
    for seed in (0, 1):
        sizes = [sum(len(b) for b in iter_split(path, spec, "random", (0.8, 0.1, 0.1), part,
                                                seed, 4096)) for part in range(3)]
        assert sizes == [7199, 900, 900]


def test_arrays_are_writable(shared_data: Path) -> None:
    """Arrays must not be read-only views of Arrow memory: the transform may write in place."""
    for name, fmt in ((CRITEO, "criteo"), (FRAPPE_TEST, "libfm")):
        path = _sample(shared_data, name)
        batch = next(iter_batches(path, spec_for(path, fmt), batch_rows=100))
        for values in (batch.labels, *batch.dense.values(), *batch.categorical.values()):
            assert values.flags.writeable
