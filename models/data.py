"""Which file, format and split a model trains and is evaluated on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

from .readers import ReadStats, iter_batches, iter_split, spec_for
from .schema import DatasetSpec, RawBatch

PARTS = {"train": 0, "valid": 1, "test": 2}
FORMATS = ("criteo", "avazu", "libfm", "csv", "parquet")


@dataclass(frozen=True)
class DataConfig:
    """A data set and its split.

    Without ``test_path`` the file at ``path`` is cut into train/valid/test by ``fractions``
    (three numbers). With ``test_path`` the file at ``path`` is cut into train/valid by the first
    two fractions and the test part is the whole of ``test_path``. ``split`` is ``position``
    (contiguous, train first: for time-ordered data such as Criteo) or ``random`` (a seeded hash of
    the row number).
    """

    path: str
    format: str
    spec_path: str | None = None
    test_path: str | None = None
    split: str = "position"
    fractions: tuple[float, ...] = (0.8, 0.1, 0.1)
    seed: int = 0
    on_error: str = "raise"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.split not in ("position", "random"):
            raise ValueError(f"split must be 'position' or 'random', got {self.split!r}")
        expected = 2 if self.test_path else 3
        if len(self.fractions) != expected or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(
                f"fractions must be {expected} numbers summing to 1, got {self.fractions}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataConfig:
        return cls(**{**data, "fractions": tuple(data["fractions"])})

    def spec(self) -> DatasetSpec:
        return spec_for(self.path, self.format, self.spec_path)

    def batches(
        self, part: str, batch_rows: int = 65536, stats: ReadStats | None = None
    ) -> Iterator[RawBatch]:
        """Raw batches of one part: ``train``, ``valid`` or ``test``."""
        spec = self.spec()
        if part == "test" and self.test_path:
            test_spec = spec_for(self.test_path, self.format, self.spec_path)
            yield from iter_batches(
                self.test_path, test_spec, batch_rows=batch_rows, on_error=self.on_error,
                stats=stats,
            )
            return
        yield from iter_split(
            self.path, spec, self.split, self.fractions, PARTS[part], self.seed,
            batch_rows=batch_rows, on_error=self.on_error, stats=stats,
        )
