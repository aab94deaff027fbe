"""Count, on the CPU, the operations that make the host wait for a GPU.

On CUDA, reading a device value on the host (``.item()``, ``float()``, ``int()``, ``bool()`` of a
tensor: ``aten._local_scalar_dense``), a data-dependent shape (boolean-mask indexing,
``nonzero``, ``masked_select``) or an index tensor built from a Python list (copied from the
host at every call) stalls the CPU until the device has drained. The CPU shows no cost for
them, so tests count them instead: a ``TorchDispatchMode`` sees every aten call.
"""

from __future__ import annotations

import collections
import traceback
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent

_ALWAYS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave_tensor"}
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as c: ...``; ``c.total``, ``c.counts`` by op, ``c.where`` by call site."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.where: collections.Counter = collections.Counter()
        self._from_host: set[int] = set()  # ids of live tensors made from Python values

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _record(self, name: str) -> None:
        self.counts[name] += 1
        frames = [f for f in traceback.extract_stack()[:-3]
                  if "sync_counter" not in f.filename and "/torch/" not in f.filename]
        ours = [f for f in frames if str(REPO) in f.filename
                and not any(d in f.filename for d in ("/tests/", "/testing/"))]
        site = ours[-1] if ours else (frames[-1] if frames else None)
        if site is not None:
            self.where[f"{name} at {Path(site.filename).name}:{site.lineno} {site.line}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _ALWAYS:
            self._record(name)
        elif name in _INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            for index in indices or ():
                if isinstance(index, torch.Tensor) and (index.dtype == torch.bool or id(index) in self._from_host):
                    self._record(f"{name}[{'bool' if index.dtype == torch.bool else 'host list'}]")
                    break
        out = func(*args, **kwargs)
        if name in ("lift_fresh", "lift_fresh_copy") and isinstance(out, torch.Tensor):
            self._from_host.add(id(out))
            weakref.finalize(out, self._from_host.discard, id(out))
        return out

    def report(self, limit: int = 12) -> str:
        return "; ".join(f"{n}x {w}" for w, n in self.where.most_common(limit))


def count_host_syncs(fn, device) -> int:
    """Host synchronisations during ``fn()``: CUDA's own sync-debug count on a GPU, else this counter."""
    if getattr(device, "type", str(device)) == "cuda":
        import warnings

        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)
    with HostSyncCounter() as counter:
        fn()
    return counter.total
