"""Row access and chunking for (..., V) logits without copying them.

Every kernel in :mod:`tre_lightning.regularizers.functional` treats its input
as N = prod(shape[:-1]) rows of V logits and walks them in chunks of rows.
A response slice such as ``logits[:, P - 1 : -1]`` cannot be viewed as one
(N, V) matrix; it is then split into the largest blocks that can (one per
leading index), so that no kernel ever copies the whole logits tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

#: Elements per chunk on CPU: 32 MiB of float32 per buffer (55 rows at
#: V = 151,936). Measured on 2 shared cores: smaller chunks pay a thread
#: barrier per op and chunk, larger ones leave the cache.
CPU_CHUNK_ELEMENTS = 1 << 23
#: Rows per chunk on accelerators (kernel-launch overhead favours big chunks).
ACCEL_CHUNK_ROWS = 1024


def default_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Rows per chunk used when a kernel gets ``chunk_size=None``.

    CPU: ``max(2, 2**23 // V)`` rows (55 rows at V = 151,936); accelerators:
    1,024 rows.
    """
    if torch.device(device).type == "cpu":
        return max(2, CPU_CHUNK_ELEMENTS // max(1, vocab_size))
    return ACCEL_CHUNK_ROWS


def resolve_chunk_size(chunk_size: int | None, vocab_size: int, device: torch.device | str) -> int:
    if chunk_size is None:
        return default_chunk_size(vocab_size, device)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision inputs, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _blocks(x: Tensor) -> list[Tensor]:
    vocab = x.shape[-1]
    try:
        return [x.view(-1, vocab)]
    except RuntimeError:
        pass
    out: list[Tensor] = []
    for i in range(x.shape[0]):
        out.extend(_blocks(x[i]))
    return out


class Rows:
    """A (..., V) tensor seen as N rows of V, in row-major order, without a copy.

    Only a tensor whose last dimension is not contiguous (stride != 1) is
    copied (``.contiguous()``); logits never are in practice.
    """

    def __init__(self, x: Tensor) -> None:
        if x.dim() == 0:
            raise ValueError("logits must have at least one dimension (..., V)")
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            x = x.contiguous()
        self.tensor = x
        self.vocab = x.shape[-1]
        self.lead_shape = x.shape[:-1]
        if x.numel() == 0:
            self.blocks: list[Tensor] = []
            self.starts: list[int] = []
            self.n = 0
            return
        self.blocks = _blocks(x)
        starts, s = [], 0
        for b in self.blocks:
            starts.append(s)
            s += b.shape[0]
        self.starts = starts
        self.n = s

    def chunks(self, size: int) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(first_row, rows)`` with ``rows`` an (r <= size, V) view."""
        for start, block in zip(self.starts, self.blocks, strict=True):
            for i in range(0, block.shape[0], size):
                yield start + i, block[i : i + size]

    def take(self, ids: Tensor) -> Tensor:
        """Copy of the rows with global indices ``ids`` (1-D long), shape (len, V)."""
        if len(self.blocks) == 1:
            return self.blocks[0].index_select(0, ids)
        out = self.blocks[0].new_empty((ids.numel(), self.vocab))
        for start, block in zip(self.starts, self.blocks, strict=True):
            sel = (ids >= start) & (ids < start + block.shape[0])
            if bool(sel.any()):
                pos = sel.nonzero().squeeze(1)
                out.index_copy_(0, pos, block.index_select(0, ids[pos] - start))
        return out


class Scratch:
    """(chunk, V) buffers reused by every chunk of one kernel call.

    Allocating a fresh temporary per chunk costs a page-faulting pass over
    it each time on CPU (large blocks are mmap-ed and unmapped); one
    allocation per call and ``out=`` writes avoid that.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = (max(1, rows), vocab)
        self.dtype = dtype
        self.device = device
        self._bufs: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, r: int, dtype: torch.dtype | None = None) -> Tensor:
        dt = self.dtype if dtype is None else dtype
        buf = self._bufs.get((name, dt))
        if buf is None:
            buf = torch.empty(self.shape, dtype=dt, device=self.device)
            self._bufs[(name, dt)] = buf
        return buf[:r]

    def padded_mask(self, r: int) -> tuple[Tensor, Tensor]:
        """(r, V) bool view into a zero-padded (r, V8) bool buffer, and that buffer.

        V8 is V rounded up to a multiple of 8, so that the buffer's rows can be
        read as int64 words; the padding columns stay False.
        """
        key = ("mask", torch.bool)
        buf = self._bufs.get(key)
        if buf is None:
            v8 = -(-self.shape[1] // 8) * 8
            buf = torch.zeros((self.shape[0], v8), dtype=torch.bool, device=self.device)
            self._bufs[key] = buf
        return buf[:r, : self.shape[1]], buf[:r]

    def as_compute(self, zc: Tensor) -> Tensor:
        """The chunk in the compute dtype (a copy into a buffer only if needed)."""
        if zc.dtype == self.dtype:
            return zc
        return self.get("z", zc.shape[0]).copy_(zc)
