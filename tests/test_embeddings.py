import math
from dataclasses import replace

import pytest
import torch

from ctrserve.models.dlrm import ModelConfig, build_model
from ctrserve.models.embeddings.base import EmbeddingTable
from ctrserve.models.embeddings.compositional import (
    CompositionalTable,
    balanced_radices,
    digits,
    quotient_remainder_radices,
)
from ctrserve.models.embeddings.constants import INIT_STD
from ctrserve.models.embeddings.full import FullTable
from ctrserve.models.embeddings.hashing import HashedTable
from ctrserve.models.embeddings.scheme_settings import (
    EmbeddingConfig,
    FullSettings,
    HashSettings,
    KPartSettings,
    LMASettings,
    QRSettings,
    RobeSettings,
    SchemeSettings,
)
from ctrserve.models.schemes import build_tables, why_full
from ctrserve.tables import print_tables

EDGES = [2**24, 2**31, 2**40]


def build_table(settings: SchemeSettings, rows: int, dim: int) -> EmbeddingTable:
    return build_tables(["t"], [rows], dim, EmbeddingConfig(default=settings))[0]


def python_digits(value: int, radices: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for radix in radices:
        out.append(value % radix)
        value //= radix
    return tuple(out)


@pytest.mark.parametrize("radices", [(4, 2**38), (7, 3, 2**38), (1 << 14, 1 << 14, 1 << 13)])
def test_digits_exact_near_float_limits(radices):
    ids = [edge + delta for edge in EDGES for delta in (-3, -2, -1, 0, 1, 2, 3)]
    ids = [i for i in ids if i < math.prod(radices)]
    got = torch.stack(digits(torch.tensor(ids, dtype=torch.int64), radices), dim=1).tolist()
    assert [tuple(row) for row in got] == [python_digits(i, radices) for i in ids]


@pytest.mark.parametrize(
    "radices",
    [quotient_remainder_radices(1000, 4), quotient_remainder_radices(1001, 7),
     balanced_radices(1000, 3), balanced_radices(997, 4), (10, 10, 10)],
)
def test_complementary_partitions_give_unique_index_tuples(radices):
    n = 997
    tuples = torch.stack(digits(torch.arange(n), radices), dim=1)
    assert len({tuple(row) for row in tuples.tolist()}) == n
    for column, radix in zip(tuples.T, radices, strict=True):
        assert int(column.min()) >= 0 and int(column.max()) < radix


def test_unique_tuples_near_two_to_the_forty():
    n = 2**40 + 5
    table = build_table(KPartSettings(partitions=3), n, 4)
    ids = torch.tensor([n - 1 - k for k in range(64)] + [2**40 - k for k in range(64)])
    tuples = torch.stack(digits(ids, table.radices), dim=1)
    assert len({tuple(r) for r in tuples.tolist()}) == len(set(ids.tolist()))


def test_qr_rows_of_distinct_ids_are_distinct():
    table = build_table(QRSettings(collisions=4, operation="mult"), 5000, 8)
    with torch.no_grad():
        for t in table.tables:
            t.weight.normal_()
        vectors = table(torch.arange(5000))
    assert torch.unique(vectors, dim=0).shape[0] == 5000


def test_balanced_radices_cover_and_are_balanced():
    for n in (10, 1000, 10131227, 2**40):
        for k in (2, 3, 4):
            radices = balanced_radices(n, k)
            assert len(radices) == k and math.prod(radices) >= n
            assert max(radices) - min(radices) <= max(2, max(radices) // 100)


def closed_form_bytes(config: SchemeSettings, n: int, dim: int) -> int:
    """Independent byte counts: fp32 weights, int64 scalars for bucket counts and radices."""
    if isinstance(config, FullSettings) or n < (config.min_rows or 0):
        return n * dim * 4
    if isinstance(config, HashSettings):
        return math.ceil(n / config.compression) * dim * 4 + 8
    if isinstance(config, QRSettings):
        rows = config.collisions + math.ceil(n / config.collisions)
        k = 2
    else:
        assert isinstance(config, KPartSettings)
        k = config.partitions
        rows = sum(balanced_radices(n, k))
    width = dim // k if config.operation == "concat" else dim
    assert config.operation != "concat" or dim % k == 0
    return rows * width * 4 + 8 * k


CONFIGS = [
    FullSettings(),
    HashSettings(compression=4),
    HashSettings(compression=16),
    QRSettings(collisions=4, operation="mult"),
    QRSettings(collisions=8, operation="add"),
    QRSettings(collisions=4, operation="concat"),
    KPartSettings(partitions=3, operation="mult"),
    KPartSettings(partitions=4, operation="concat"),
    QRSettings(collisions=4, min_rows=50_000),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_bytes_agree_three_ways(config):
    n, dim = 10_007, 16
    table = build_table(config, n, dim)
    real = sum(t.numel() * t.element_size() for t in table.inference_tensors().values())
    assert table.inference_bytes() == real == closed_form_bytes(config, n, dim)
    assert table.full_bytes() == n * dim * 4


def test_qr_at_four_collisions_is_about_four_times_smaller():
    table = build_table(QRSettings(collisions=4), 1_000_000, 16)
    assert 3.99 < table.full_bytes() / table.inference_bytes() < 4.0


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_combined_vectors_start_at_the_scale_of_a_plain_table(operation):
    torch.manual_seed(0)
    n = 200_000
    table = CompositionalTable(n, 16, quotient_remainder_radices(n, 16), operation)
    with torch.no_grad():
        vectors = table(torch.randint(0, n, (20_000,)))
    plain = FullTable(n, 16).table.weight.detach()
    assert vectors.std().item() == pytest.approx(INIT_STD, rel=0.1)
    assert plain.std().item() == pytest.approx(INIT_STD, rel=0.05)


def test_hashing_is_id_mod_buckets():
    table = HashedTable(1000, 4, 250)
    ids = torch.tensor([3, 253, 503, 999])
    with torch.no_grad():
        out = table(ids)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert torch.equal(out[3], table.table.weight[999 % 250])


def test_small_tables_stay_full_under_threshold():
    assert isinstance(build_table(QRSettings(min_rows=100), 99, 8), FullTable)
    assert isinstance(build_table(QRSettings(min_rows=100), 100, 8), CompositionalTable)


def test_uncovering_radices_are_refused():
    with pytest.raises(ValueError, match="complementary"):
        CompositionalTable(101, 8, (10, 10), "mult")


@pytest.mark.parametrize(("settings", "reason"), [
    (HashSettings(compression=4), "hash at 4x leaves one bucket for all 4 ids"),
    (QRSettings(collisions=4), "qr takes 336 bytes, the full table 256"),
    (LMASettings(), "lma's metadata alone exceed the full table (256 bytes) over its "
                    "compression"),
    (RobeSettings(), "robe's metadata alone exceed the full table (256 bytes) over its "
                     "compression"),
], ids=lambda value: getattr(value, "scheme", ""))
def test_tables_a_scheme_cannot_shrink_stay_full_and_say_why(settings, reason, capsys):
    names, sizes = ["gender", "user"], [4, 5000]  # two values, the missing and unseen ids
    tables = build_tables(names, sizes, 16, EmbeddingConfig(default=settings))
    assert isinstance(tables[0], FullTable) and tables[1].scheme == settings.scheme
    assert why_full(settings, 4, 16) == reason and why_full(settings, 5000, 16) == ""
    model = build_model(0, sizes, names, ModelConfig(dim=16, top=(8,),
                                                     embeddings=EmbeddingConfig(default=settings)))
    summaries = model.table_summaries()
    assert [s["full_because"] for s in summaries] == [reason, ""]
    print_tables(summaries)
    assert reason in capsys.readouterr().out
    # A min_rows of its own is what the user asked for: every table from that size is taken.
    forced = build_tables(names, sizes, 16, EmbeddingConfig(default=replace(settings,
                                                                            min_rows=0)))
    assert [table.scheme for table in forced] == [settings.scheme] * 2
    assert why_full(replace(settings, min_rows=10), 4, 16) == "under min_rows (10)"
