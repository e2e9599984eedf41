import math

import numpy as np
import pytest
import torch
from torch import nn

from ctrserve.models.embeddings.constants import INIT_STD
from ctrserve.models.embeddings.lma import (
    LMATable,
    fallback_signatures,
    lma_max_compression,
    lma_memory_size,
    minhash_signatures,
)
from ctrserve.models.embeddings.robe import (
    RobeTable,
    robe_max_compression,
    robe_memory_size,
)
from ctrserve.models.embeddings.shared_memory import PRIME, SharedMemory
from ctrserve.models.trainer import TrainConfig, optimizers

EDGES = [2**24, 2**31, 2**40]


def real_bytes(table) -> int:
    return sum(t.numel() * t.element_size() for t in table.inference_tensors().values())


def shares(size: int, claims: list[int]) -> list[int]:
    """Independent proportional split of |M| values; the remainder goes to the first table."""
    out = [size * c // sum(claims) for c in claims]
    out[0] = size - sum(out[1:])
    return out


# --- LMA -----------------------------------------------------------------------------------------

ROWS = 4000


def overlapping_columns(seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Three columns, rows in random order (ids 0 and 1 never occur).

    Column 0 value ``2 + i`` occurs in rows ``10i .. 10i+9``; column 1 value ``3 + i`` in rows
    ``10i+2 .. 10i+11``: 8 shared rows of 12, Jaccard 2/3. Column 2 is noise.
    """
    rows = np.arange(ROWS)
    rng = np.random.default_rng(seed)
    sparse = np.stack(
        [2 + rows // 10, 2 + (rows + 8) // 10, rng.integers(0, 50, ROWS)], axis=1
    ).astype(np.int64)
    return sparse[rng.permutation(ROWS)], [ROWS // 10 + 2, ROWS // 10 + 3, 50]


def chunks(sparse: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(sparse, np.cumsum(sizes)[:-1])


def lma_tables(signatures: dict[int, np.ndarray], sizes: list[int], dim: int, memory_size: int,
               seed: int = 0) -> list[LMATable]:
    memory = SharedMemory(memory_size, seed=seed)
    return [LMATable(sizes[c], dim, memory, signatures[c]) for c in sorted(signatures)]


def test_lma_pairs_with_similar_cooccurrence_share_memory():
    sparse, sizes = overlapping_columns()
    dim, memory_size = 16, 512
    signatures = minhash_signatures([sparse], sizes, minhashes=8, sample_rows=ROWS, seed=3)
    tables = lma_tables(signatures, sizes, dim, memory_size)
    i = torch.arange(ROWS // 10 - 1)
    left = tables[0].locations(2 + i)
    similar = tables[1].locations(3 + i)
    unrelated = tables[1].locations(2 + (i + 200) % (ROWS // 10))
    similar_share = (left == similar).double().mean().item()
    random_share = (left == unrelated).double().mean().item()
    comparisons = left.numel()
    ratio = similar_share / max(random_share, 1 / comparisons)
    print(f"LMA sharing: Jaccard 2/3 pairs {similar_share:.3f}, unrelated {random_share:.4f}, "
          f"ratio {ratio:.0f}")
    assert similar_share == pytest.approx(2 / 3, abs=0.1)
    assert random_share < 4 / memory_size
    assert ratio > 3


def test_lma_identical_sets_give_identical_signatures_and_minhash_rate_tracks_jaccard():
    rows = np.arange(ROWS)
    shift = np.array([0, 1, 3, 5, 8])  # Jaccard (10 - s) / (10 + s): 1, 9/11, 7/13, 5/15, 2/18
    sparse = np.stack([2 + (rows + s) // 10 for s in shift], axis=1).astype(np.int64)
    sizes = [ROWS // 10 + 3] * len(shift)
    signatures = minhash_signatures([sparse], sizes, minhashes=32, sample_rows=ROWS, seed=1)
    # value 2 + i spans rows 10i .. 10i+9 in column 0 and 10i-s .. 10i+9-s in a shifted column
    inner = slice(3, ROWS // 10 + 1)  # away from the first and last rows
    for column, s in enumerate(shift):
        equal = (signatures[0][inner] == signatures[column][inner]).mean()
        jaccard = (10 - s) / (10 + s)
        assert equal == pytest.approx(jaccard, abs=0.05), (s, equal, jaccard)


def test_lma_signatures_do_not_depend_on_chunking_and_stop_at_the_sample():
    sparse, sizes = overlapping_columns()
    one = minhash_signatures([sparse], sizes, 4, sample_rows=3000)
    garbage = np.zeros((500, 3), dtype=np.int64)  # beyond the sample: must be ignored

    def stream():
        yield from chunks(sparse[:3100], [1000, 999, 1101])
        yield garbage
        raise AssertionError("read past the sample")

    several = minhash_signatures(stream(), sizes, 4, sample_rows=3000)
    for column in range(3):
        assert np.array_equal(one[column], several[column])
        assert one[column].dtype == np.int32 and one[column].shape == (sizes[column], 4)


def test_lma_fallback_for_unseen_ids_is_deterministic():
    sparse, sizes = overlapping_columns()
    sizes[0] += 5  # ids 402..406 never occur
    builds = [minhash_signatures(chunks(sparse, [1500, 2500]), sizes, 2, ROWS, seed=9)
              for _ in range(2)]
    unseen = np.array([0, 1, *range(sizes[0] - 5, sizes[0])])
    expected = fallback_signatures(0, unseen, 2, seed=9)
    for signatures in builds:
        assert np.array_equal(signatures[0][unseen], expected)
    assert not np.array_equal(fallback_signatures(1, unseen, 2, seed=9), expected)
    assert not np.array_equal(fallback_signatures(0, unseen, 2, seed=10), expected)
    assert len({tuple(row) for row in expected}) == len(unseen)
    locations = [lma_tables(s, sizes, 16, 1000)[0].locations(torch.from_numpy(unseen))
                 for s in builds]
    assert torch.equal(locations[0], locations[1])


def test_lma_rejects_ids_outside_the_table():
    with pytest.raises(ValueError, match=r"column 1: ids must lie in \[0, 5\)"):
        minhash_signatures([np.array([[0, 5]])], [3, 5], 1, sample_rows=10)


def lma_closed_form(n: int, dim: int, minhashes: int, memory_values: int) -> int:
    """fp32 memory share, int32 signatures, int64 (a_j, c_j) per coordinate."""
    return memory_values * 4 + n * minhashes * 4 + dim * 2 * 8


def test_lma_budget_and_bytes_agree_three_ways():
    sizes, dim, minhashes, compression = [10_007, 3, 50_000], 16, 1, 10.0
    full = sum(sizes) * dim * 4
    memory_size = lma_memory_size(sizes, dim, minhashes, compression)
    signatures = {c: fallback_signatures(c, np.arange(n), minhashes) for c, n in enumerate(sizes)}
    tables = lma_tables(signatures, sizes, dim, memory_size)
    assert tables[0].memory.size == memory_size
    assert tables[0].memory.values.weight.shape == (memory_size, 1)
    split = shares(memory_size, [n * dim * 4 for n in sizes])
    total = 0
    for table, n, values in zip(tables, sizes, split, strict=True):
        closed = lma_closed_form(n, dim, minhashes, values)
        assert table.inference_bytes() == real_bytes(table) == closed
        assert table.parameter_count() == values
        total += closed
    assert total == memory_size * 4 + sum(n * minhashes * 4 + dim * 16 for n in sizes)
    assert full / compression - 4 < total <= full / compression
    memory = torch.cat([t.inference_tensors()["memory"] for t in tables])
    assert torch.equal(memory, tables[0].memory.values.weight.detach().view(-1))
    assert sum(t.summary()["parameters"] for t in tables) == memory_size


def test_lma_unreachable_budget_is_a_clear_error():
    sizes, dim = [100_000, 20_000], 16
    limit = lma_max_compression(sizes, dim, minhashes=1)
    assert 15.9 < limit < 16
    assert lma_max_compression(sizes, dim, minhashes=4) < 4
    lma_memory_size(sizes, dim, 1, compression=15.9)
    with pytest.raises(ValueError, match=r"LMA signatures .* alone take"):
        lma_memory_size(sizes, dim, 1, compression=16)
    with pytest.raises(ValueError, match=r"most this configuration reaches is 3\.999x"):
        lma_memory_size(sizes, dim, 4, compression=4)


# --- ROBE ----------------------------------------------------------------------------------------


def python_robe_locations(ids: list[int], coefficients: list[list[int]], block: int, dim: int,
                          memory_size: int) -> list[list[int]]:
    """Big-integer reference: h = (a0 d0 + a1 d1 + a2 d2 + c) mod p over 21-bit digits."""
    out = []
    for x in ids:
        digits = [x % 2**21, (x >> 21) % 2**21, x >> 42, 1]
        hashes = [sum(a * d for a, d in zip(row, digits, strict=True)) % PRIME
                  for row in coefficients]
        out.append([(hashes[j // block] % memory_size + j % block) % memory_size
                    for j in range(dim)])
    return out


@pytest.mark.parametrize(("memory_size", "block", "dim"),
                         [(1_000_003, 4, 10), (7, 4, 16), (PRIME, 1, 16), (2**30 + 5, 16, 16)])
def test_robe_hash_is_exact_near_float_and_int_limits(memory_size, block, dim):
    table = RobeTable(2**62, dim, SharedMemory(1, seed=5), block)
    table.memory.size = memory_size  # only the modulus matters here; no values are read
    ids = [e + d for e in EDGES for d in (-3, -2, -1, 0, 1, 2, 3)] + [0, 1, 2**62 - 1, 2**63 - 1]
    got = table.locations(torch.tensor(ids, dtype=torch.int64)).tolist()
    assert got == python_robe_locations(ids, table.coefficients.tolist(), block, dim,
                                         memory_size)


def test_robe_is_deterministic_and_in_range():
    memory_size, block, dim = 10_007, 4, 16
    ids = torch.cat([torch.randint(0, 2**62, (5000,)), torch.arange(1000)])

    def locations(seed: int) -> list[torch.Tensor]:
        memory = SharedMemory(memory_size, seed=seed)
        tables = [RobeTable(2**62, dim, memory, block) for _ in range(2)]
        return [t.locations(ids) for t in tables]

    first, again, other = locations(0), locations(0), locations(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    for table_locations in first:
        assert int(table_locations.min()) >= 0 and int(table_locations.max()) < memory_size
        # consecutive values within each block, wrapping around the end of M
        steps = table_locations.view(-1, dim // block, block).diff(dim=2)
        assert bool(((steps == 1) | (steps == 1 - memory_size)).all())
    # two tables on one memory hash the same id differently; random pairs rarely collide
    assert (first[0] == first[1]).double().mean().item() < 10 / memory_size
    assert (first[0][:2500] == first[0][2500:5000]).double().mean().item() < 10 / memory_size


def robe_closed_form(dim: int, block: int, memory_values: int) -> int:
    """fp32 memory share, int64 (a0, a1, a2, c) per block, the int64 block size."""
    return memory_values * 4 + math.ceil(dim / block) * 4 * 8 + 8


@pytest.mark.parametrize(("dim", "block"), [(16, 1), (16, 4), (10, 4), (1, 2)])
def test_robe_budget_and_bytes_agree_three_ways(dim, block):
    sizes, compression = [10_007, 3, 50_000], 12.5
    full = sum(sizes) * dim * 4
    memory_size = robe_memory_size(sizes, dim, block, compression)
    memory = SharedMemory(memory_size)
    tables = [RobeTable(n, dim, memory, block) for n in sizes]
    split = shares(memory_size, [n * dim * 4 for n in sizes])
    closed = [robe_closed_form(dim, block, values) for values in split]
    for table, expected in zip(tables, closed, strict=True):
        assert table.inference_bytes() == real_bytes(table) == expected
    assert full / compression - 4 < sum(closed) <= full / compression
    memory_values = torch.cat([t.inference_tensors()["memory"] for t in tables])
    assert torch.equal(memory_values, memory.values.weight.detach().view(-1))


def test_robe_unreachable_budget_is_a_clear_error():
    sizes = [1000]
    assert robe_max_compression(sizes, 16, 1) == 1000 * 64 / (16 * 32 + 8 + 4)
    with pytest.raises(ValueError, match="ROBE hash coefficients alone take 520 bytes"):
        robe_memory_size(sizes, 16, 1, compression=200)


def test_memory_size_is_bounded_by_the_hash_prime():
    with pytest.raises(ValueError, match="1 to 2147483647 values"):
        SharedMemory(PRIME + 1)


# --- Both: training ------------------------------------------------------------------------------


def build(scheme: str, sizes: list[int], dim: int, memory_size: int) -> nn.ModuleList:
    memory = SharedMemory(memory_size, seed=2)
    if scheme == "robe":
        return nn.ModuleList(RobeTable(n, dim, memory, block=4) for n in sizes)
    signatures = {c: fallback_signatures(c, np.arange(n), 2) for c, n in enumerate(sizes)}
    return nn.ModuleList(LMATable(n, dim, memory, signatures[c]) for c, n in enumerate(sizes))


@pytest.mark.parametrize("scheme", ["lma", "robe"])
def test_sparse_adam_trains_the_shared_memory(scheme):
    torch.manual_seed(0)
    sizes, dim, memory_size = [300, 500], 8, 5000
    tables = build(scheme, sizes, dim, memory_size)
    (optimizer,) = optimizers(tables, TrainConfig(embedding_lr=0.05))
    assert isinstance(optimizer, torch.optim.SparseAdam)
    memory = tables[0].memory
    assert [p for group in optimizer.param_groups for p in group["params"]] == [
        memory.values.weight
    ]
    ids = [torch.randint(0, n, (64,)) for n in sizes]
    target = torch.randn(64, dim)
    before = memory.values.weight.detach().clone()
    losses = []
    for _ in range(5):
        out = tables[0](ids[0]) + tables[1](ids[1])
        assert out.shape == (64, dim)
        loss = ((out - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        assert memory.values.weight.grad.is_sparse
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    touched = torch.zeros(memory_size, dtype=torch.bool)
    for table, table_ids in zip(tables, ids, strict=True):
        touched[table.locations(table_ids).flatten()] = True
    changed = (memory.values.weight.detach() != before).view(-1)
    assert bool(changed[touched].all()) and not bool(changed[~touched].any())


@pytest.mark.parametrize("scheme", ["lma", "robe"])
def test_state_dict_round_trip_keeps_one_shared_memory(scheme):
    torch.manual_seed(1)
    sizes, dim = [300, 500], 8
    trained = build(scheme, sizes, dim, 2000)
    if scheme == "lma":
        with torch.no_grad():
            trained[1].signatures.copy_(torch.randint(0, 2**31 - 1, trained[1].signatures.shape))
    rebuilt = build(scheme, sizes, dim, 2000)
    rebuilt.load_state_dict(trained.state_dict())
    ids = torch.arange(300)
    with torch.no_grad():
        for old, new in zip(trained, rebuilt, strict=True):
            assert torch.equal(old(ids), new(ids))
    assert rebuilt[0].memory is rebuilt[1].memory
    assert len(list(rebuilt.parameters())) == 1


@pytest.mark.parametrize("scheme", ["lma", "robe"])
def test_embeddings_start_at_the_scale_of_a_plain_table(scheme):
    torch.manual_seed(0)
    tables = build(scheme, [20_000], 16, 50_000)
    with torch.no_grad():
        vectors = tables[0](torch.arange(20_000))
    assert vectors.std().item() == pytest.approx(INIT_STD, rel=0.05)
