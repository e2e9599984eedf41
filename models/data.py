"""Which file, format and split a model trains and is evaluated on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

from .readers import ReadStats, iter_batches, iter_split, spec_for
from .schema import DatasetSpec, RawBatch

PARTS = ("train", "valid", "test")
FORMATS = ("criteo", "avazu", "libfm", "csv", "parquet")


@dataclass(frozen=True)
class DataConfig:
    """A data set and its split.

    The parts not given as files of their own (``valid_path``, ``test_path``) are cut from the
    file at ``path``, in the order train, valid, test, by ``fractions``: one number per part cut
    (three without either file, one with both). Each part holds exactly its fraction of the
    rows, rounded (``readers.part_sizes``). ``split`` is ``position`` (contiguous, train first:
    for time-ordered data such as Criteo) or ``random`` (the rows ranked by a hash of the row
    number seeded by ``split_seed``, which is the split's own: the training seed never moves
    it, so trainings with different seeds are compared on the same rows).

    ``column_spec`` is the column spec itself (``DatasetSpec.to_dict``) where it is not in a
    file at ``spec_path``: ``ctrserve train`` keeps the one it infers here, so the checkpoint
    reads its data again without any other file.
    """

    path: str
    format: str
    spec_path: str | None = None
    test_path: str | None = None
    valid_path: str | None = None
    split: str = "position"
    fractions: tuple[float, ...] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    on_error: str = "raise"
    column_spec: dict | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.split not in ("position", "random"):
            raise ValueError(f"split must be 'position' or 'random', got {self.split!r}")
        cut = self.cut_parts()
        if len(self.fractions) != len(cut) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(
                f"fractions must be {len(cut)} numbers summing to 1 ({', '.join(cut)}), got "
                f"{self.fractions}"
            )

    def cut_parts(self) -> tuple[str, ...]:
        """The parts cut from ``path``: those without a file of their own."""
        files = {"valid": self.valid_path, "test": self.test_path}
        return tuple(part for part in PARTS if not files.get(part))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataConfig:
        data = dict(data)
        if "seed" in data:  # checkpoints written before the split had a seed of its own
            data["split_seed"] = data.pop("seed")
        return cls(**{**data, "fractions": tuple(data["fractions"])})

    def spec(self) -> DatasetSpec:
        return self._spec_of(self.path)

    def _spec_of(self, path: str) -> DatasetSpec:
        if self.column_spec is not None:
            return replace(DatasetSpec.from_dict(self.column_spec), format=self.format)
        return spec_for(path, self.format, self.spec_path)

    def part_source(self, part: str) -> tuple[str, DatasetSpec, int | None]:
        """The file ``part`` is read from, its spec, and the part's index among the parts cut
        from ``path`` (None: the part is the whole of a file of its own)."""
        own_file = {"valid": self.valid_path, "test": self.test_path}.get(part)
        if own_file:
            return own_file, self._spec_of(own_file), None
        return self.path, self.spec(), self.cut_parts().index(part)

    def batches(
        self, part: str, batch_rows: int = 65536, stats: ReadStats | None = None
    ) -> Iterator[RawBatch]:
        """Raw batches of one part: ``train``, ``valid`` or ``test``."""
        path, spec, cut = self.part_source(part)
        if cut is None:
            yield from iter_batches(path, spec, batch_rows=batch_rows, on_error=self.on_error,
                                    stats=stats)
            return
        yield from iter_split(
            path, spec, self.split, self.fractions, cut, self.split_seed,
            batch_rows=batch_rows, on_error=self.on_error, stats=stats,
        )
