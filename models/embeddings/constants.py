"""Numbers every scheme shares: the widths of the stored dtypes and the initial scale of embedding
values. No torch here: the scheme settings (and through them the CLI, for every command) read
them."""

FLOAT32_BYTES = 4
INT32_BYTES = 4
INT64_BYTES = 8

#: Standard deviation of a freshly initialised embedding value, for every scheme: combined
#: vectors (products, sums, concatenations) are initialised to this same scale.
INIT_STD = 0.1


def index_bytes(largest: int) -> int:
    """Bytes of one stored index or count that may reach ``largest``: int32 while it fits,
    int64 beyond (PEP's offsets, the hybrid's block ranks)."""
    return INT32_BYTES if largest < 2**31 else INT64_BYTES
