"""The hybrid executor (native/executor.c) from Python: a loaded Model's forward placed on a device as a plan says.

    from dgguf.runtime import Model
    from dgguf.runtime.gpu import use_device
    m = Model.load("model.gguf")
    plan = use_device(m, "host", budget=64 << 20)     # or "cuda" (device 0), "cuda:1"
    out = m.generate(...)                             # the passes now run on the executor

Backends: "host" is the host backend (the CPU twins on host memory standing for device memory, the budget
enforced, every crossing counted): how tests and `dgguf run --gpu host` run the executor without a GPU; "cuda"
loads libdgcuda.so (runtime/cuda.py) and hands its backend to the executor. The plan comes from
runtime/planner.py for the file's own tensors; the executor's device allocations must equal the plan's groups to
the byte, which use_device checks before the first pass.
"""
from __future__ import annotations

import ctypes

import numpy as np

from dgguf.core._native import ffi, lib
from dgguf.core.errors import DggufError
from dgguf.core.native import ERRLEN, check

from . import planner as P
from .native_model import decode_args, token_ids

PLACEMENTS = {"gpu": lib.DG_EXPERTS_DEVICE, "cpu": lib.DG_EXPERTS_CPU, "stream": lib.DG_EXPERTS_STREAM}
GROUPS = {"embedding": lib.DG_GROUP_EMBEDDING, "globals": lib.DG_GROUP_GLOBALS, "layers": lib.DG_GROUP_LAYERS,
          "buffers": lib.DG_GROUP_BUFFERS, "workspace": lib.DG_GROUP_WORKSPACE, "staging": lib.DG_GROUP_STAGING,
          "kv_cache": lib.DG_GROUP_KV_CACHE}


class Backend:
    """A dg_backend: the host backend with a budget, or the CUDA backend from libdgcuda.so."""

    def __init__(self, ptr, owner=None):
        self._b = ptr
        self._owner = owner      # the CUDA library: kept loaded while its backend lives

    @classmethod
    def host(cls, budget: int, threads: int = 1) -> "Backend":
        err = ffi.new("char[]", ERRLEN)
        b = lib.dg_host_backend_new(int(budget), int(threads), err, ERRLEN)
        if b == ffi.NULL:
            raise DggufError(ffi.string(err).decode(errors="replace"))
        return cls(ffi.gc(b, lib.dg_backend_free))

    @classmethod
    def cuda(cls, device: int, budget: int, library=None) -> "Backend":
        """The CUDA backend on `device` with TF32 GEMMs, allocating at most `budget` bytes."""
        from .cuda import cuda_status
        status = cuda_status(library)
        if not status.available:
            raise DggufError(f"--gpu: {status.reason}")
        cu = status.library
        cu.dgc_backend_new.restype = ctypes.c_void_p
        cu.dgc_backend_new.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_char_p, ctypes.c_size_t]
        err = ctypes.create_string_buffer(ERRLEN)
        addr = cu.dgc_backend_new(int(device), 1, int(budget), err, ERRLEN)
        if not addr:
            raise DggufError(f"--gpu {device}: {err.value.decode(errors='replace')}")
        return cls(ffi.gc(ffi.cast("dg_backend *", addr), lib.dg_backend_free), cu)

    @property
    def name(self) -> str:
        return ffi.string(lib.dg_backend_name(self._b)).decode()

    def stats(self) -> dict:
        st = ffi.new("dg_backend_stats *")
        lib.dg_backend_get_stats(self._b, st)
        return {k: int(getattr(st, k)) for k in ("allocated", "peak", "budget", "allocations", "h2d", "d2h",
                                                 "h2d_copies", "d2h_copies")}


class DeviceModel:
    """The executor over a NativeModel's weights (they stay mapped: CPU and streamed experts read them), with
    NativeModel's new_cache, so a Model's generate and canvas_logits run on it unchanged."""

    def __init__(self, native, backend: Backend, layers: list[str], kv_type: str = "f16",
                 max_tokens: int | None = None):
        cfg = native.cfg
        if len(layers) != cfg.n_layers or set(layers) - set(PLACEMENTS):
            raise DggufError(f"a placement names gpu, cpu or stream for each of the {cfg.n_layers} layers")
        self.native, self.cfg, self.threads, self.backend = native, cfg, native.threads, backend
        self.layers = list(layers)
        self.max_tokens = max_tokens or cfg.canvas_length
        self._experts = ffi.new("int32_t[]", [PLACEMENTS[w] for w in layers])
        conf = ffi.new("dg_exec_config *")
        conf.max_tokens = self.max_tokens
        conf.kv_f16 = {"f16": 1, "f32": 0}[kv_type]
        conf.experts = self._experts
        err = ffi.new("char[]", ERRLEN)
        x = lib.dg_exec_new(native._model, backend._b, conf, err, ERRLEN)
        if x == ffi.NULL:
            raise DggufError(ffi.string(err).decode(errors="replace"))
        # the executor borrows the backend and the mapped weights: its destructor keeps them alive until it runs
        self._x = ffi.gc(x, lambda p, keep=(backend, native): lib.dg_exec_free(p))

    def stats(self) -> dict:
        st = ffi.new("dg_exec_stats *")
        lib.dg_exec_get_stats(self._x, st)
        out = {name: int(st.group[i]) for name, i in GROUPS.items()}
        out["experts"] = [int(lib.dg_exec_expert_bytes(self._x, i)) for i in range(self.cfg.n_layers)]
        for k in ("load_h2d", "pass_h2d", "pass_d2h"):
            out[k] = int(getattr(st, k))
        return out

    def new_cache(self, capacity: int) -> "DeviceCache":
        return DeviceCache(self, capacity)


class DeviceCache:
    """One sequence's KV cache on the device, with NativeCache's methods."""

    def __init__(self, model: DeviceModel, capacity: int):
        capacity = int(capacity)
        if capacity < 1:
            raise DggufError(f"cache capacity must be positive, got {capacity}")
        self.model, self.capacity = model, capacity
        err = ffi.new("char[]", ERRLEN)
        c = lib.dg_exec_cache_new(model._x, capacity, err, ERRLEN)
        if c == ffi.NULL:
            raise DggufError(ffi.string(err).decode(errors="replace"))
        self._c = ffi.gc(c, lambda p, x=model._x: lib.dg_exec_cache_free(p))   # the executor outlives it

    @property
    def length(self) -> int:
        return int(lib.dg_exec_cache_length(self._c))

    def encode(self, ids) -> None:
        a = token_ids(ids, self.model.cfg.vocab_size, "encode")
        if self.length + a.size > self.capacity:
            raise DggufError(f"encode: {a.size} tokens after {self.length} exceed the cache capacity "
                             f"{self.capacity}")
        err = ffi.new("char[]", ERRLEN)
        check(lib.dg_exec_encode(self._c, ffi.from_buffer("int32_t[]", a), a.size, err, ERRLEN), err)

    def decode(self, ids, sc_logits=None, out=None, sc_top_k: int = 0, head_rows=None) -> np.ndarray:
        """NativeCache.decode on the executor, the cheaper steps included (head_rows: only those rows' logits
        are computed and copied back; sc_top_k: the host backend only)."""
        a, sc, rows, out = decode_args(ids, self.model.cfg.vocab_size, sc_logits, out, head_rows)
        err = ffi.new("char[]", ERRLEN)
        check(lib.dg_exec_decode(self._c, ffi.from_buffer("int32_t[]", a), a.size, sc, int(sc_top_k), rows,
                                 ffi.from_buffer("float[]", out), err, ERRLEN), err)
        return out

    def truncate(self, n: int) -> None:
        err = ffi.new("char[]", ERRLEN)
        check(lib.dg_exec_cache_truncate(self._c, int(n), err, ERRLEN), err)


def check_against_plan(dm: DeviceModel, plan: "P.Plan") -> None:
    """The executor's device bytes per group equal the plan's (a cache of plan.ctx positions is made and freed
    to measure the KV group): a difference is a bug in one of them, reported as such."""
    got = dm.stats()
    cache = dm.new_cache(plan.ctx)
    kv = dm.stats()["kv_cache"] - got["kv_cache"]
    del cache
    planned = {g.name: g.bytes for g in plan.groups if g.placement == "gpu"}
    have = {"embedding": got["embedding"], "globals": got["globals"], "layers": got["layers"],
            "buffers": got["buffers"], "workspace": got["workspace"], "kv_cache": kv}
    if got["staging"]:
        have["staging"] = got["staging"]
    for i, b in enumerate(got["experts"]):
        if b:
            have[f"blk.{i}.experts"] = b
    planned.pop("reserve", None)
    if have != planned:
        diff = {k: (planned.get(k), have.get(k)) for k in sorted(set(planned) | set(have))
                if planned.get(k) != have.get(k)}
        raise DggufError(f"internal error: the executor's device bytes differ from the plan's (plan, executor): "
                         f"{diff}")


def use_device(model, backend: str | Backend, plan: "P.Plan", threads: int | None = None,
               library=None, device: int = 0) -> DeviceModel:
    """Run `model`'s passes on the executor with the plan's placement: backend "host" (budget: the plan's device
    bytes) or "cuda" (on `device`), or a Backend. Replaces model.native; returns the DeviceModel."""
    native = getattr(model.native, "native", model.native)
    if not isinstance(backend, Backend):
        budget = plan.budget_bytes - plan.reserve_bytes
        if backend == "host":
            backend = Backend.host(budget, threads or native.threads)
        elif backend == "cuda":
            backend = Backend.cuda(device, budget, library)
        else:
            raise DggufError(f"backend {backend!r} must be host or cuda")
    dm = DeviceModel(native, backend, plan.layers, plan.kv_cache)
    check_against_plan(dm, plan)
    model.native = dm
    return dm
