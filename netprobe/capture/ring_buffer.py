"""A fixed-capacity ring buffer of rows that lives on the activations' device."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from netprobe._validation import check_int

__all__ = ["RingBuffer", "STORAGE_DTYPES"]

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class RingBuffer:
    """Preallocated ``(capacity, dim)`` storage with wraparound writes, oldest rows overwritten first.

    The storage is allocated once, on the device of the first rows written (or at construction
    when ``dim`` and ``device`` are given), and never grows or moves afterwards. Writes are pure
    device-side copies whose positions are computed on the host from tensor *shapes* only, so a
    write never synchronises the host with the device (no ``.item()``, ``.cpu()``, ``.tolist()``
    or data-dependent branching).

    Args:
        capacity: number of rows kept (the newest ``capacity`` rows written).
        dim: row width; inferred from the first write when ``None``.
        dtype: storage dtype: ``torch.float32`` (default), ``torch.float16``, ``torch.bfloat16``
            (half the memory, about 3 and 2 significant digits) or ``torch.float64``.
        device: storage device; the first write's device when ``None``.
        store_targets: also keep one ``int64`` target per row (e.g. the class label), so that
            per-class statistics can be formed later.

    Memory: ``capacity * dim * dtype.itemsize`` bytes, plus ``capacity * 8`` with targets
    (:attr:`nbytes`, exact once allocated).

    Example:
        >>> buf = RingBuffer(4)
        >>> buf.write(torch.arange(6.).reshape(3, 2))
        >>> buf.write(torch.tensor([[6., 7.], [8., 9.]]))
        >>> buf.read()[:, 0].tolist()    # the newest 4 rows, oldest first
        [2.0, 4.0, 6.0, 8.0]
    """

    def __init__(
        self,
        capacity: int,
        *,
        dim: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
        store_targets: bool = False,
    ) -> None:
        check_int(capacity, "capacity", 1, " (rows kept)")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"Expected `dtype` to be one of {[str(d) for d in STORAGE_DTYPES]}, but got {dtype}."
            )
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(f"Expected `dim` to be a positive int or None, but got {dim!r}.")
        self.capacity = capacity
        self.dtype = dtype
        self.store_targets = bool(store_targets)
        self._dim = dim
        self._data: Optional[torch.Tensor] = None
        self._targets: Optional[torch.Tensor] = None
        self._pos = 0  # next row to write (host int)
        self._count = 0  # rows held, <= capacity (host int)
        self._written = 0  # rows ever written since the last reset
        if dim is not None and device is not None:
            self._allocate(dim, torch.device(device))

    # -- allocation -----------------------------------------------------------------
    def _allocate(self, dim: int, device: torch.device) -> None:
        # Never an inference tensor (a first write under `torch.inference_mode()`, e.g. in a Lightning
        # validation loop, must not make later writes outside it fail), never part of a graph.
        with torch.inference_mode(False), torch.no_grad():
            self._dim = dim
            self._data = torch.zeros((self.capacity, dim), dtype=self.dtype, device=device)
            if self.store_targets:
                self._targets = torch.full((self.capacity,), -1, dtype=torch.long, device=device)

    @property
    def allocated(self) -> bool:
        """Whether the storage exists (allocated at construction when ``dim`` and ``device`` are given, else at the first write)."""
        return self._data is not None

    @property
    def dim(self) -> Optional[int]:
        """The width of a row (``None`` until given or until the first write)."""
        return self._dim

    @property
    def device(self) -> Optional[torch.device]:
        """The device the rows are stored on (``None`` until the storage is allocated)."""
        return None if self._data is None else self._data.device

    @property
    def nbytes(self) -> int:
        """Exact bytes held by the storage (0 before the first write)."""
        n = 0
        if self._data is not None:
            n += self._data.numel() * self._data.element_size()
        if self._targets is not None:
            n += self._targets.numel() * self._targets.element_size()
        return n

    def data_ptr(self) -> int:
        """Address of the storage (stable from the first write on)."""
        if self._data is None:
            raise ValueError("The buffer is not allocated yet: nothing was written to it.")
        return self._data.data_ptr()

    def __len__(self) -> int:
        return self._count

    @property
    def total_written(self) -> int:
        """Rows written since creation or the last :meth:`reset` (including overwritten ones)."""
        return self._written

    # -- writes -----------------------------------------------------------------------
    def write(self, rows: torch.Tensor, targets: Optional[torch.Tensor] = None) -> None:
        """Append ``rows`` ``(k, dim)`` (and their ``targets`` ``(k,)``); keeps the newest ``capacity``.

        A batch larger than the capacity keeps its last ``capacity`` rows. Rows are cast to the
        storage dtype and copied to the storage device.
        """
        if rows.ndim != 2:
            raise ValueError(f"Expected `rows` to be 2-D (k, dim), but got shape {tuple(rows.shape)}.")
        k, d = rows.shape
        if self._data is None:
            if self._dim is not None and d != self._dim:
                raise ValueError(f"Expected rows of width {self._dim} (the buffer's `dim`), but got {d}.")
            self._allocate(d, rows.device)
        elif d != self._dim:
            raise ValueError(
                f"Expected rows of width {self._dim} (the width of the first write), but got {d}. "
                "A layer's reduced output must keep the same number of units between calls."
            )
        if self.store_targets:
            if targets is None:
                raise ValueError("This buffer stores targets: pass `targets` (k,) with the rows.")
            if targets.shape != (k,):
                raise ValueError(f"Expected `targets` of shape ({k},), but got {tuple(targets.shape)}.")
        if k == 0:
            return
        cap = self.capacity
        self._written += k
        if k >= cap:
            rows = rows[k - cap :]
            if targets is not None:
                targets = targets[k - cap :]
            k = cap
        first = min(k, cap - self._pos)
        self._copy(self._pos, rows[:first], None if targets is None else targets[:first])
        if first < k:
            self._copy(0, rows[first:], None if targets is None else targets[first:])
        self._pos = (self._pos + k) % cap
        self._count = min(cap, self._count + k)

    def _copy(self, start: int, rows: torch.Tensor, targets: Optional[torch.Tensor]) -> None:
        n = rows.shape[0]
        self._data[start : start + n].copy_(rows, non_blocking=True)  # type: ignore[index]
        if self._targets is not None and targets is not None:
            self._targets[start : start + n].copy_(targets, non_blocking=True)

    # -- reads ------------------------------------------------------------------------
    def _order(self) -> Tuple[slice, ...]:
        if self._count < self.capacity:
            return (slice(0, self._count),)
        return (slice(self._pos, self.capacity), slice(0, self._pos))

    def read(self) -> torch.Tensor:
        """A copy of the held rows ``(len(self), dim)``, oldest first, in the storage dtype."""
        if self._data is None:
            return torch.empty((0, self._dim or 0), dtype=self.dtype)
        parts = [self._data[s] for s in self._order()]
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def read_targets(self) -> torch.Tensor:
        """A copy of the held targets ``(len(self),)``, aligned with :meth:`read`."""
        if not self.store_targets:
            raise ValueError("This buffer does not store targets; create it with `store_targets=True`.")
        if self._targets is None:
            return torch.empty((0,), dtype=torch.long)
        parts = [self._targets[s] for s in self._order()]
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def reset(self) -> None:
        """Forget every row; the storage stays allocated where it is."""
        self._pos = 0
        self._count = 0
        self._written = 0

    def __repr__(self) -> str:
        return (
            f"RingBuffer(capacity={self.capacity}, dim={self._dim}, dtype={self.dtype}, "
            f"device={self.device}, rows={self._count}, nbytes={self.nbytes})"
        )
