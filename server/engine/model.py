"""δ-mem inside vLLM: model classes, per-request state on the worker, the worker RPC.

Per-request state channel. A request brings its initial state, write start, known states and
snapshot positions inline in `SamplingParams.extra_args["deltamem"]` (base64 float32 blobs),
so they travel with the request through vLLM's own scheduler messages and reach the worker in
`scheduled_new_reqs` with no side channel to keep consistent. The final state and the
snapshots come back through `collective_rpc("deltamem_take_states", …)` once the request has
finished; the worker keeps finished states in a bounded outbox until then.

Invariants (docs/design.md §3) and where they hold:
- writes idempotent by position (invariant 2): each request carries `pos`, the number of its
  tokens already through the model; a step must start at `pos` (chunked prefill continues), at
  a position whose state the request knows (`known`: 0, or a prefix-cache hit that the
  scheduler capped to such a point, invariant 3), and 0 after a preemption restarts from the
  initial state. Anything else is a bug and raises.
- snapshots: the state before a given prompt position (`snap_at`: the turn's first new
  message, a later window start) and before the last KV block boundary the request reached
  (the next turn's cache hit lands there) are copied out of the scan as it passes them.
- the last sampled token is unabsorbed (invariant 5), yet the worker may have fed it: a stop
  string ends a request in the API process a step or more after the worker ran on, and vLLM's
  async scheduling (CUDA) runs a request's next step before its stop token is seen. So before
  each one-token step a request's state is kept (the last `HISTORY` of them, in a ring beside
  the pool), and the caller takes the state at the position it knows is absorbed.

SSW adapters (`message_mean`) write per message, as the reference's session runtime: a
request brings its `ingests` (`Ingest`: prompt spans whose tokens all read the state from
before the span, and whose messages' means are written in order at its end, also when
chunked prefill splits it); every other token from the write start on, generated ones
included, is written as its own one-token message, which is a token write. Resuming inside
an ingest would need its messages' partial sums, so states are only snapshotted, and known,
at safe points (`RequestMemory.safe`).
"""

from __future__ import annotations

import base64
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from deltamem.adapter import Adapter, load_adapter
from deltamem.layer import DeltaMem, activations, unit_key
from deltamem.scan import delta_rule_scan, delta_rule_scan_varlen

log = logging.getLogger(__name__)

EXTRA_ARGS_KEY = "deltamem"
OUTBOX_MAX = 4096
OUTBOX_TTL_S = 600.0
# States kept per request from before its last one-token steps: async scheduling runs at most
# one step past a stop; a stop string is seen in the API process, a few steps behind at most.
HISTORY = 4
# Steps of up to this many tokens run the read-out inside the CPU kernel, as a loop of
# matrix-vector products (`_cpu_kernel.scan_read_out`); longer ones call the GEMM. In the
# served engine a oneDNN GEMM call cost about 40 µs a layer at one token, mostly call overhead,
# the loop 5-8; at 8 tokens, with cold caches, 90 against 60, and warm they cross near 8.
READ_OUT_IN_KERNEL = 8


def encode_state(state: torch.Tensor | None) -> str | None:
    if state is None:
        return None
    return base64.b64encode(state.detach().to(torch.float32).contiguous().cpu().numpy()
                            .tobytes()).decode("ascii")


def decode_state(blob: str | bytes, shape: tuple[int, ...]) -> torch.Tensor:
    raw = base64.b64decode(blob) if isinstance(blob, str) else blob
    arr = np.frombuffer(raw, dtype=np.float32)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"δ-mem state has {arr.size} values, expected shape {shape}")
    return torch.from_numpy(arr.copy()).view(shape)


@dataclass(frozen=True)
class Ingest:
    """SSW: prompt tokens [start, end) read the state from before `start`; at `end` each of
    `messages` (prompt spans inside it, in order) is written once, with its tokens' mean."""

    start: int
    end: int
    messages: tuple[tuple[int, int], ...] = ()

    def to_json(self) -> list:
        return [self.start, self.end, [list(m) for m in self.messages]]

    @classmethod
    def from_json(cls, doc) -> Ingest:
        start, end, messages = doc
        return cls(int(start), int(end), tuple((int(a), int(b)) for a, b in messages))


@dataclass
class RequestMemory:
    initial: torch.Tensor  # (L, H, r, r) float32
    state: torch.Tensor  # a view of its row of the runtime's pool while it holds one
    write_start: int
    key: str  # the caller's request id (vLLM appends a suffix to its own ids)
    known: dict[int, torch.Tensor] = field(default_factory=dict)  # prompt pos -> state there
    snap_at: tuple[int, ...] = ()  # prompt positions whose state the caller wants back
    pos: int = 0  # tokens of this request already through the model
    taken: bool = False  # final state already handed out
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # asked-for ones
    block: tuple[int, torch.Tensor] | None = None  # the last KV block boundary passed
    keep: bool = True  # hand the final state and snapshots back (False: a caller without use)
    ingests: tuple[Ingest, ...] = ()  # SSW: clipped to the write start, in order
    # SSW: (start, end, ingest index) of every message the request writes, in order, and
    # their pre-activation k, v, β sums, (L, messages, 3, H, r), as the prefill passes them.
    messages: tuple[tuple[int, int, int], ...] = ()
    sums: torch.Tensor | None = None
    row: int = -1  # its row of the runtime's state pool, -1: none (not yet run, or moved out)
    # The states before its last one-token steps: (position, view of its ring slot, the block
    # snapshot then), newest last, at most HISTORY; emptied by any longer step or a move out.
    # Their positions are consecutive, so position % HISTORY picks distinct ring slots.
    history: list[tuple[int, torch.Tensor, tuple[int, torch.Tensor] | None]] = field(
        default_factory=list)

    def safe(self, p: int) -> bool:
        """Whether the state before position p is all a resume there needs: no message has
        tokens before p and is still to be written at or after it."""
        return not any(a < p < g.end for g in self.ingests for a, _ in g.messages)

    def results(self) -> dict[int, dict]:
        """By position: the state there (the latest, and the kept earlier ones) with the
        snapshots, as the API process receives them."""
        snaps = {str(p): _tensor_bytes(t) for p, t in self.snapshots.items()}
        shape = list(self.state.shape)
        out = {}
        for pos, state, block in (*self.history, (self.pos, self.state, self.block)):
            out[pos] = {"state": _tensor_bytes(state), "shape": shape, "pos": pos,
                        "snapshots": snaps}
            if block is not None:
                out[pos]["block"] = [block[0], _tensor_bytes(block[1])]
        return out


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


@dataclass
class _StepPlan:
    req_ids: list[str]
    num_tokens: np.ndarray  # per request, this step
    start_pos: np.ndarray  # per request, position of its first token this step


class DeltaMemRuntime:
    """The worker-side δ-mem: adapter module, per-request states, per-step batch layout.

    States live in one pool, (L, rows, H, r, r) float32, a row per request while it runs (a
    request's `state` is a view of its row), so a step reads and writes them in place with no
    per-step gather or copy. Two rows at the end are not requests': a row of zeros for padding
    tokens (and warm-up runs) to read, and a spare row the torch scan scatters what it must
    discard to. Every tensor the `deltamem::scan` op reads (the pool, and on the torch path
    each token's row and write mask) is allocated once, so a CUDA graph captured for N tokens
    replays for any step of N tokens: `begin_forward` refills them in place, before the graph.

    Two scan paths behind the op (`scan`): "kernel", the compiled numba kernel (the CPU's
    default: the 8×8 arithmetic in registers); "torch", `delta_rule_scan_varlen` (every other
    device's, capturable; on the CPU for tests).
    """

    def __init__(self, module: DeltaMem, device: torch.device, *, max_requests: int = 32,
                 max_tokens: int = 2048, scan: str = "auto"):
        self.module = module.to(device=device, dtype=torch.float32).eval()
        self.device = device
        self.block_size = 0  # the KV cache's, set by the runner hook before the first step
        cfg = module.cfg
        self.layer_ids = cfg.layers
        self.slot_of = {i: s for s, i in enumerate(self.layer_ids)}
        self.state_shape = (len(self.layer_ids), cfg.num_state_heads, cfg.rank, cfg.rank)
        self.ssw = cfg.writes_messages
        if scan == "auto":
            scan = "kernel" if device.type == "cpu" else "torch"
        if scan not in ("kernel", "torch") or (scan == "kernel" and device.type != "cpu"):
            raise ValueError(f"δ-mem scan path {scan!r} on {device}: 'kernel' (CPU) or 'torch'")
        self.scan = scan
        self.requests: dict[str, RequestMemory] = {}
        self.outbox: OrderedDict[str, tuple[float, dict[int, dict]]] = OrderedDict()
        self._plan: _StepPlan | None = None
        # The pool: rows [0, R) for requests (twice the engine's batch, so that requests the
        # scheduler set aside rarely need to move out), then the zero row and the spare row.
        L, H, r, _ = self.state_shape
        rows = 2 * max(1, max_requests)
        self.pool = torch.zeros((L, rows + 2, H, r, r), dtype=torch.float32, device=device)
        self.zero_row = rows  # padding reads it with writes off, so it stays zero
        # The ring of earlier states, (L, HISTORY · rows, H, r, r): slot s of pool row w at
        # column s · rows + w, so a step's copies are one index_select and one index_copy_.
        self.history = torch.zeros((L, HISTORY * self.pool.shape[1], H, r, r),
                                   dtype=torch.float32, device=device)
        self._free = list(range(rows - 1, -1, -1))
        # The torch path's per-token layout, padding tokens at the zero row, writing nothing.
        self._tok_rows = torch.full((max_tokens,), self.zero_row, dtype=torch.int64,
                                    device=device)
        self._tok_mask = torch.zeros(max_tokens, dtype=torch.bool, device=device)
        self._tok_snap = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        # Per step:
        self.step_open = False  # begun, not yet committed (see end_forward)
        self._active: list[RequestMemory] | None = None
        self._cu_np: np.ndarray | None = None
        self._mask: torch.Tensor | None = None
        # Snapshots: per request the positions this step copies out (`_snap_pos`: asked ones,
        # the block boundary or -1, and the sorted columns), into `_snaps` (L, B·P + 1, H, r,
        # r) (the last row spare) seen as (L, B, P, H, r, r) through `_snaps_bp`.
        self._snap_at: np.ndarray | None = None  # (B, P) flat token indices, -1: none
        self._snap_pos: list = []
        self._snaps: torch.Tensor | None = None
        self._snaps_bp: torch.Tensor | None = None
        self._snap_after: list[tuple[int, int]] = []  # torch path: (b, column) after the step
        self._n_valid = 0
        # SSW, a step where some request's tokens are in an ingest: per request, where its
        # scan is cut ([(position, ingest ending there or None)], ascending) and its first
        # position; None on other steps.
        self._ingest_cuts: list[tuple[int, list[tuple[int, int | None]]]] | None = None
        self.recomputes = 0  # requests restarted from their initial state (preemption)
        self.moved_out = 0  # states moved out of the pool for want of a row
        self.fused_projections = 0  # layers whose projections run in their qkv_proj
        # Per slot, the read-out: (its linear map or None, the kernel's float32 copy, dtype).
        self._read_out: dict[int, tuple] = {}
        self._bias_np: dict[int, np.ndarray] = {}
        self.states_before_latest = 0  # states handed out from before the worker's last step
        if scan == "kernel":
            # Imported here, in the worker once the model loads, not with this module: numba's
            # llvmlite in sys.modules when vLLM's worker starts breaks its Triton-override scan
            # (vLLM 0.32.0, llvmlite 0.47: AttributeError on an llvmlite ffi wrapper), and the
            # API process imports this module before spawning the engine.
            from deltamem import _cpu_kernel

            self._kernel = _cpu_kernel
            self._pool_np = self.pool.numpy()
            self._pool_flat = self._pool_np.reshape(L, self.pool.shape[1], -1)
            self._history_flat = self.history.numpy().reshape(L, self.history.shape[1], -1)
            none = np.zeros(0, dtype=np.int64)  # compiled now, not in a request's step
            self._kernel.copy_columns(self._pool_flat, none, self._history_flat, none)
            self._no_snaps: dict[int, tuple] = {}
        _RUNTIMES.append(self)
        self.id = len(_RUNTIMES) - 1  # the `deltamem::scan` op's way back here

    def install(self, attn: torch.nn.Module, layer_idx: int,
                dtype: torch.dtype = torch.float32) -> None:
        """Give a module (vLLM's attention of that layer) this layer's δ-mem, as
        `memory_corrections` reads it: its weights packed into two linear maps (a step costs
        two matmuls instead of six: decode is dominated by per-op overhead, not arithmetic;
        in the engine `fuse_projection` then moves the first into the layer's qkv_proj),
        its sizes, and the op's way back to this runtime.

        In (4m × d) = [W_q; W_k; W_v; W_β], its bias [0, 0, 0, b_β] apart, float32 (the op adds
        it); out ((q_out + d) × m) =
        (α/r)[B_q; B_o]. Kept as buffers of plain submodules, off the parameters, so vLLM's
        loader never looks for them. They are in `dtype`, the model's: the projections and the
        read-out run as the backbone's own linear layers do (in a bfloat16 engine on the CPU
        through vLLM's prepacked CPU GEMM, about twice as fast as torch's matmul at these
        sizes, and half the bytes of float32), the state and its scan always in float32.
        """
        mem = self.module.layer(layer_idx)
        c = mem.cfg
        m = c.mem_dim
        with torch.no_grad():
            W = torch.cat([mem.w_q.weight, mem.w_k.weight, mem.w_v.weight, mem.w_beta.weight])
            b = torch.cat([torch.zeros(3 * m, dtype=torch.float32, device=W.device),
                           mem.w_beta.bias.float()])
            parts = [x.weight for x in (mem.b_q, mem.b_o) if x is not None]
            B = c.scale * torch.cat(parts) if parts else None
        attn.deltamem_in = _linear_map(W, None, dtype)
        attn.register_buffer("deltamem_in_bias", b, persistent=False)
        # The read-out runs inside the op (`scan_layer`), so the runtime keeps it, by slot.
        slot = self.slot_of[layer_idx]
        if B is None:
            self._read_out[slot] = (None, None, dtype)
        else:
            lin = _linear_map(B, None, dtype)
            # The kernel's copy: (m, q_out + d) float32 of the very values the GEMM uses.
            w = lin.weight.float().t().contiguous().numpy() if self.scan == "kernel" else None
            self._read_out[slot] = (lin, w, dtype)
        if self.scan == "kernel":  # a view of the buffer, made once (numpy() costs per call)
            self._bias_np[slot] = b.numpy()
        attn.deltamem_out_width = 0 if B is None else B.shape[0]
        attn.deltamem_q_out = c.q_out_size if mem.b_q is not None else 0
        attn.deltamem_runtime_id, attn.deltamem_slot = self.id, slot

    # --- request lifecycle (called from the model runner hooks) ------------------------------
    def _memory_of(self, req_id: str, runner_requests) -> RequestMemory:
        rm = self.requests.get(req_id)
        if rm is not None:
            return rm
        extra = {}
        req = runner_requests.get(req_id)
        if req is not None and req.sampling_params is not None:
            extra = (req.sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY) or {}
        blob = extra.get("state")
        init = (decode_state(blob, self.state_shape) if blob else
                torch.zeros(self.state_shape, dtype=torch.float32))
        init = init.to(self.device)
        known = {int(p): decode_state(b, self.state_shape).to(self.device)
                 for p, b in (extra.get("known") or {}).items()}
        known[0] = init
        rm = RequestMemory(init, init.clone(), int(extra.get("write_start", 0)),
                           str(extra.get("key", req_id)), known,
                           tuple(sorted(int(p) for p in extra.get("snap_at") or ())),
                           keep=bool(extra.get("keep", True)))
        if self.ssw:
            rm.ingests = self._parse_ingests(extra.get("ingests"), rm.write_start, req_id)
            rm.messages = tuple((a, b, i) for i, g in enumerate(rm.ingests)
                                for a, b in g.messages)
            bad = [p for p in (*rm.known, *rm.snap_at) if not rm.safe(p)]
            if bad:
                raise ValueError(f"δ-mem request {req_id}: states asked for or given at "
                                 f"{bad}, inside an ingest's messages")
        elif extra.get("ingests"):
            raise ValueError(f"δ-mem request {req_id}: ingests given, but the adapter writes "
                             "per token")
        self.requests[req_id] = rm
        return rm

    def _parse_ingests(self, doc, write_start: int, req_id: str) -> tuple[Ingest, ...]:
        """The request's ingests, checked (in order, apart, messages inside them) and clipped
        to its write start (tokens before it write nothing)."""
        if doc is None:
            raise ValueError(f"δ-mem request {req_id}: an SSW adapter's request needs its "
                             "ingests (which prompt tokens form which messages)")
        out, last = [], 0
        for g in map(Ingest.from_json, doc):
            p, ok = g.start, last <= g.start <= g.end
            for a, b in g.messages:
                ok = ok and p <= a < b <= g.end
                p = b
            if not ok:
                raise ValueError(f"δ-mem request {req_id}: ingests out of order, or messages "
                                 f"outside theirs: {doc}")
            msgs = tuple((max(a, write_start), b) for a, b in g.messages if b > write_start)
            out.append(Ingest(g.start, g.end, msgs))
            last = g.end
        return tuple(out)

    def plan_step(self, req_ids, num_scheduled, num_computed, runner_requests,
                  block_size: int = 0) -> None:
        """The next step's batch: its requests in order, their tokens this step and the
        positions they start at (`begin_forward` lays it out)."""
        self.block_size = block_size or self.block_size
        self._plan = _StepPlan(list(req_ids), np.asarray(num_scheduled, dtype=np.int64).copy(),
                               np.asarray(num_computed, dtype=np.int64).copy())
        for rid in self._plan.req_ids:
            self._memory_of(rid, runner_requests)

    def on_request_removed(self, req_id: str) -> None:
        self.end_forward()
        rm = self.requests.pop(req_id, None)
        if rm is None:
            return
        if not rm.taken and rm.keep:
            self.outbox[rm.key] = (time.monotonic(), rm.results())
            self._trim_outbox()
        if rm.row >= 0:
            self._free.append(rm.row)
            rm.row = -1

    def _trim_outbox(self) -> None:
        now = time.monotonic()
        while self.outbox and (len(self.outbox) > OUTBOX_MAX
                               or now - next(iter(self.outbox.values()))[0] > OUTBOX_TTL_S):
            self.outbox.popitem(last=False)

    def take_states(self, keys: list[str], positions: dict[str, int] | None = None
                    ) -> dict[str, dict]:
        """Hand out final states (float32 bytes) by the caller's request ids, each at the
        position `positions` gives (its absorbed tokens; default: the latest); forget them.
        A state that is no longer kept comes back as {"missing": position, "pos": latest}."""
        self.end_forward()
        out = {}
        live = {rm.key: rm for rm in self.requests.values()}
        for key in keys:
            if key in self.outbox:
                _, got = self.outbox.pop(key)
            elif key in live:
                live[key].taken = True
                got = live[key].results()
            else:
                continue
            want = (positions or {}).get(key, max(got))
            self.states_before_latest += int(want in got and want < max(got))
            out[key] = got.get(want) or {"missing": want, "pos": max(got)}
        return out

    # --- one forward --------------------------------------------------------------------------
    def _claim_row(self, rm: RequestMemory, running: set[int]) -> None:
        """Give a request about to run a row of the pool, its state copied in."""
        if rm.row >= 0:
            return
        if not self._free:
            # Every row is held: move out the state of a request this step does not run (one
            # the scheduler set aside; it gets a row back when it runs again).
            out = next((m for m in self.requests.values()
                        if m.row >= 0 and id(m) not in running), None)
            if out is None:
                raise RuntimeError(f"δ-mem state pool of {self.zero_row} rows is smaller than "
                                   f"a step's {len(running)} requests")
            out.state = out.state.clone()
            out.history = []
            self._free.append(out.row)
            out.row = -1
            self.moved_out += 1
        rm.row = self._free.pop()
        view = self.pool[:, rm.row]
        view.copy_(rm.state)
        rm.state = view

    def begin_forward(self, num_tokens: int) -> None:
        """Lay out the step `plan_step` planned (or, with none, a throwaway run of
        `num_tokens` tokens, as vLLM's profiling, warm-up and graph-capture runs are) for
        every layer's scan. Called by the runner hook before the forward, so that a replayed
        CUDA graph, which runs no Python, finds the step in the buffers it reads."""
        self.end_forward()  # a step whose forward was a graph replay is committed here
        self.step_open = True
        plan, self._plan = self._plan, None
        self._snap_at = self._snaps = self._snaps_bp = None
        self._snap_after = []
        self._ingest_cuts = None
        if plan is None or not plan.req_ids:
            self._active = None
            self._cu_np = np.array([0, num_tokens], dtype=np.int64)
            self._rows_np = np.array([self.zero_row], dtype=np.int64)
            self._mask_np = np.zeros(num_tokens, dtype=bool)
            self._mask = torch.from_numpy(self._mask_np)
            self._n_valid = num_tokens
            self._fill_token_layout(np.full(num_tokens, self.zero_row, dtype=np.int64))
            self._prepare_kernel()
            return
        active = [self.requests[rid] for rid in plan.req_ids]
        running = {id(rm) for rm in active}
        for rm in active:
            self._claim_row(rm, running)
        write_starts = np.empty(len(active), dtype=np.int64)
        for b, (rid, rm, p0) in enumerate(zip(plan.req_ids, active, plan.start_pos,
                                              strict=True)):
            if p0 != rm.pos:
                if int(p0) in rm.known or p0 <= rm.write_start:
                    # A prefix-cache hit (capped by the scheduler to a point whose state the
                    # request knows: a known one, or any up to its write start, where the
                    # state is still the initial one), or a recompute after preemption (p0 =
                    # 0, its tokens must not read their own future): resume from there.
                    rm.state.copy_(rm.known.get(int(p0), rm.initial))
                    rm.pos = int(p0)
                    rm.sums = None  # SSW: known points are safe, nothing pending before them
                    self.recomputes += int(p0 == 0)
                else:
                    self.step_open = False
                    raise RuntimeError(
                        f"δ-mem request {rid}: step starts at position {p0} but {rm.pos} tokens "
                        f"are absorbed and the request knows the state only at "
                        f"{sorted(rm.known)} (the scheduler's prefix-cache cap failed)")
            write_starts[b] = rm.write_start
        self._active = active
        self._rows_np = np.array([rm.row for rm in active], dtype=np.int64)
        self._keep_history(active, plan.num_tokens)
        # Token t of request b sits at position start_pos[b] + (t - cu[b]); it writes iff that
        # is at or after the request's write start.
        n = plan.num_tokens
        cu = np.zeros(len(n) + 1, dtype=np.int64)
        np.cumsum(n, out=cu[1:])
        pos = np.repeat(plan.start_pos - cu[:-1], n) + np.arange(cu[-1])
        self._mask_np = pos >= np.repeat(write_starts, n)
        inside = np.zeros(len(pos), dtype=bool)
        if self.ssw:  # tokens of an ingest read and write nothing themselves
            for b, rm in enumerate(active):
                for g in rm.ingests:
                    inside[cu[b]:cu[b + 1]] |= (pos[cu[b]:cu[b + 1]] >= g.start) & (
                        pos[cu[b]:cu[b + 1]] < g.end)
            self._mask_np &= ~inside
        self._cu_np = cu
        self._mask = torch.from_numpy(self._mask_np)
        self._n_valid = int(cu[-1])
        self._plan_snapshots(active, plan.start_pos, n, cu)
        if inside.any():
            self._ingest_cuts = self._plan_ingest_cuts(active, plan.start_pos, n)
        else:
            self._fill_token_layout(np.repeat(self._rows_np, n))
            self._route_snapshots(active, plan.start_pos, n, cu)
        for rm, k in zip(active, n, strict=True):
            rm.pos += int(k)
        self._prepare_kernel()

    def _keep_history(self, active: list[RequestMemory], num_tokens: np.ndarray) -> None:
        """Before a step: into the ring, the state of each request that runs one token (a
        decode step, whose token may lie past its stop), in one copy for the batch."""
        cols, rows = [], []
        width = self.pool.shape[1]
        for rm, k in zip(active, num_tokens, strict=True):
            if k != 1 or not rm.keep:
                rm.history = []
                continue
            rm.history = [h for h in rm.history if rm.pos - HISTORY < h[0] < rm.pos]
            col = rm.pos % HISTORY * width + rm.row
            rm.history.append((rm.pos, self.history[:, col], rm.block))
            cols.append(col)
            rows.append(rm.row)
        if not rows:
            return
        if self.scan == "kernel":
            self._kernel.copy_columns(self._pool_flat, np.array(rows, dtype=np.int64),
                                      self._history_flat, np.array(cols, dtype=np.int64))
        else:
            self.history.index_copy_(1, torch.tensor(cols, device=self.device),
                                     self.pool.index_select(1, torch.tensor(
                                         rows, device=self.device)))

    def _fill_token_layout(self, tok_rows: np.ndarray) -> None:
        """The torch path's token buffers, refilled in place (a captured graph reads them)."""
        if self.scan != "torch":
            return
        n = len(tok_rows)
        if n > self._tok_rows.shape[0]:
            # Only a step longer than the engine's token budget (tests) gets here; on CUDA
            # that budget sizes the buffers before any graph is captured.
            self._tok_rows = torch.full((n,), self.zero_row, dtype=torch.int64,
                                        device=self.device)
            self._tok_mask = torch.zeros(n, dtype=torch.bool, device=self.device)
            self._tok_snap = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._tok_rows[:n].copy_(torch.from_numpy(tok_rows))
        self._tok_rows[n:].fill_(self.zero_row)
        self._tok_mask[:n].copy_(self._mask)
        self._tok_mask[n:].fill_(False)

    def _prepare_kernel(self) -> None:
        """The numba kernel's arguments that every layer of this step shares."""
        if self.scan != "kernel":
            return
        B = len(self._cu_np) - 1
        if self._snap_at is None or self._ingest_cuts is not None:
            # No snapshots: empty arrays of this batch size, made once (decode's hot path).
            if B not in self._no_snaps:
                empty = np.empty((B, 0, *self.state_shape[1:]), dtype=np.float32)
                self._no_snaps[B] = (np.full((B, 0), -1, dtype=np.int64),
                                     [empty] * self.state_shape[0])
            self._snap_at_np, self._snaps_np = self._no_snaps[B]
        else:
            self._snap_at_np = self._snap_at
            self._snaps_np = [self._snaps_bp[s].numpy() for s in range(self.state_shape[0])]

    def _plan_snapshots(self, active, start_pos, num_tokens, cu) -> None:
        """Which states this step copies out, per request: the asked-for positions it passes,
        and the last KV block boundary it passes, one column per distinct position. Flat
        token indices for the kernel; a request's end offset means after its last token."""
        positions = []
        for b, rm in enumerate(active):
            p0, p1 = int(start_pos[b]), int(start_pos[b]) + int(num_tokens[b])
            asked = [p for p in rm.snap_at if p0 <= p <= p1]
            bs = self.block_size
            blk = (p1 // bs) * bs if bs and rm.keep else 0
            if self.ssw and not rm.safe(blk):
                blk = -1  # a resume there would lack the pending messages' sums
            blk = blk if blk > p0 else -1
            positions.append((asked, blk, sorted({*asked, blk} - {-1})))
        width = max(len(cols) for _, _, cols in positions)
        if width == 0:
            return
        at = np.full((len(active), width), -1, dtype=np.int64)
        for b, (_, _, cols) in enumerate(positions):
            at[b, :len(cols)] = [cu[b] + p - int(start_pos[b]) for p in cols]
        self._snap_at, self._snap_pos = at, positions
        L, B = self.state_shape[0], len(active)
        self._snaps = torch.zeros((L, B * width + 1, *self.state_shape[1:]),
                                  dtype=torch.float32, device=self.device)
        self._snaps_bp = self._snaps[:, :B * width].view(L, B, width, *self.state_shape[1:])

    def _route_snapshots(self, active, start_pos, num_tokens, cu) -> None:
        """The torch path's snapshots: the state before the request's first token of the step
        is copied now, the one after its last at commit, and one in between by the scan, from
        the token before it (`_tok_snap`: each token's destination row, else the spare)."""
        if self.scan != "torch" or self._snaps is None:
            return
        width = self._snap_at.shape[1]
        spare = self._snaps.shape[1] - 1
        dest = np.full(self._tok_snap.shape[0], spare, dtype=np.int64)
        for b, (rm, (_, _, cols)) in enumerate(zip(active, self._snap_pos, strict=True)):
            p0, p1 = int(start_pos[b]), int(start_pos[b]) + int(num_tokens[b])
            for j, p in enumerate(cols):
                if p == p0:
                    self._snaps_bp[:, b, j] = rm.state
                elif p == p1:
                    self._snap_after.append((b, j))
                else:
                    dest[cu[b] + p - p0 - 1] = b * width + j
        self._tok_snap.copy_(torch.from_numpy(dest))

    def _plan_ingest_cuts(self, active, start_pos, num_tokens) -> list:
        """Per request, where this step's scan stops: the ends of its ingests (their
        messages are written there), its snapshot positions, and its last token."""
        plans = []
        for b, rm in enumerate(active):
            p0 = int(start_pos[b])
            p1 = p0 + int(num_tokens[b])
            ends = {g.end: i for i, g in enumerate(rm.ingests) if p0 < g.end <= p1}
            cols = self._snap_pos[b][2] if self._snaps is not None else ()
            cuts = sorted({p1, *ends, *cols})
            plans.append((p0, [(z, ends.get(z)) for z in cuts]))
        return plans

    def end_forward(self) -> None:
        """Commit the step: hand its snapshots to their requests. The states need nothing,
        they were written in place. Idempotent: called after the forward where Python runs
        after it, and otherwise (a replayed CUDA graph) before whatever next reads them."""
        if not self.step_open:
            return
        self.step_open = False
        if self._active is not None and self._snaps is not None:
            for b, j in self._snap_after:
                self._snaps_bp[:, b, j] = self._active[b].state
            for b, (rm, (asked, blk, cols)) in enumerate(zip(self._active, self._snap_pos,
                                                             strict=True)):
                for p in asked:
                    rm.snapshots[p] = self._snaps_bp[:, b, cols.index(p)].clone()
                if blk >= 0:
                    rm.block = (blk, self._snaps_bp[:, b, cols.index(blk)].clone())
        self._active = self._snaps = self._snaps_bp = self._snap_at = None

    def scan_layer(self, slot: int, proj: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The body of the `deltamem::scan` op: run this step's scan for one layer, advance
        the requests' states in place, and return the read-out (N, q_out + d), Δq | Δo in the
        engine's dtype (zeros for padding). `proj` (N, 4m) holds the step's tokens'
        projections W x without their bias (`bias`, (4m,) float32), padding included, in the
        engine's dtype; where `fuse_projection` put them in qkv_proj, a view of its output."""
        n, N = self._n_valid, proj.shape[0]
        lin, w, dtype = self._read_out[slot]
        H, r = self.state_shape[1:3]
        if (self._ingest_cuts is None and self.scan == "kernel"
                and dtype in (torch.bfloat16, torch.float32)):  # the kernel's (float16: torch)
            # Straight into the compiled kernel, which adds the bias and applies the
            # activations itself, on arguments prepared once a step (numpy views, no copies):
            # any wrapper's conversions, or a compiled kernel of their own, cost more than the
            # scan at decode.
            args = (_numpy(proj), self._bias_np[slot], self._mask_np, self._cu_np,
                    self._rows_np, self._pool_np[slot])
            snaps = (self._snap_at_np, self._snaps_np[slot])
            if w is not None and N <= READ_OUT_IN_KERNEL:
                out, out_np = _empty(N, w.shape[1], dtype)
                self._kernel.scan_read_out(*args, *snaps, w, out_np)
                return out
            reads, reads_np = _empty(N, H * r, dtype)
            self._kernel.scan_projections(*args, reads_np, *snaps)
            if n < N:
                reads[n:].zero_()
        else:
            p = (proj.float() + bias).view(N, 4, H, r)
            x = activations(p)
            if self._ingest_cuts is not None:
                out = torch.zeros((N, H, r), dtype=torch.float32, device=self.device)
                self._scan_ingests(slot, x, p, out)
            else:
                snaps = None if self._snaps is None else self._snaps[slot]
                out = delta_rule_scan_varlen(
                    *x.unbind(1), self._tok_mask[:N], self._tok_rows[:N], self.pool[slot],
                    snaps, None if snaps is None else self._tok_snap[:N])
            reads = out.view(N, H * r).to(dtype)
        if lin is None:
            return reads.new_empty((N, 0))
        return _apply(lin, reads)

    def _scan_ingests(self, slot: int, x: torch.Tensor, proj: torch.Tensor,
                      reads: torch.Tensor) -> None:
        """SSW, a step in which some request's tokens are in an ingest (`x` the activations,
        `proj` the projections with their bias, (N, 4, H, r) float32): request by request,
        the token scan in pieces cut where an ingest ends (its messages are written there, in
        order, each once with its tokens' mean) and where a snapshot is taken. Per request
        in Python: a turn's prefill passes here once, decode steps take the batched path."""
        L = self.state_shape[0]
        mask = self._mask.to(self.device)
        q, k, v, beta = x.unbind(1)
        for b, (rm, (p0, cuts)) in enumerate(zip(self._active, self._ingest_cuts, strict=True)):
            lo = int(self._cu_np[b])
            state = self.pool[slot, rm.row]
            if rm.messages and rm.sums is None:
                rm.sums = torch.zeros((L, len(rm.messages), 3, *self.state_shape[1:3]),
                                      dtype=torch.float32, device=self.device)
            cols = self._snap_pos[b][2] if self._snaps is not None else ()
            a = p0
            for z, ended in cuts:
                if z > a:
                    t0, t1 = lo + a - p0, lo + z - p0
                    r, final = delta_rule_scan(q[None, t0:t1], k[None, t0:t1],
                                               v[None, t0:t1], beta[None, t0:t1],
                                               state[None], mask[None, t0:t1])
                    reads[t0:t1] = r[0]
                    state.copy_(final[0])
                    for j, (ma, mb, _) in enumerate(rm.messages):
                        ma, mb = max(ma, a), min(mb, z)
                        if ma < mb:
                            rm.sums[slot, j] += proj[lo + ma - p0:lo + mb - p0, 1:].sum(0)
                    a = z
                if ended is not None:
                    self._write_messages(rm, slot, ended, state)
                if z in cols:
                    self._snaps_bp[slot, b, cols.index(z)] = state

    def _write_messages(self, rm: RequestMemory, slot: int, ingest: int,
                        state: torch.Tensor) -> None:
        """Write an ingest's messages into `state` (H, r, r), in order: each its tokens'
        mean k̂, v̂, β, as `DeltaMemLayer.scan_messages` does with the mean x."""
        rows = [j for j, (_, _, i) in enumerate(rm.messages) if i == ingest]
        if not rows:
            return
        counts = torch.tensor([float(rm.messages[j][1] - rm.messages[j][0]) for j in rows],
                              device=self.device)
        mean = rm.sums[slot, rows] / counts[:, None, None, None]  # (M, 3, H, r)
        k = unit_key(mean[:, 0])
        _, final = delta_rule_scan(k[None], k[None], mean[None, :, 1],
                                   torch.sigmoid(mean[None, :, 2]), state[None])
        state.copy_(final[0])


# --- the scan as an op the compiler treats as opaque ------------------------------------------

# The op finds its runtime by number: ops take tensors and scalars, not Python objects.
_RUNTIMES: list[DeltaMemRuntime] = []


def deltamem_scan(proj: torch.Tensor, bias: torch.Tensor, runtime: int, slot: int
                  ) -> torch.Tensor:
    """`deltamem::scan`: one layer's δ-mem over the current step's tokens, from their
    projections (`proj`, W x without the bias) to their read-out (Δq | Δo, returned):
    activations, the delta-rule scan, the read-out, under the step layout that
    `DeltaMemRuntime.begin_forward` prepared (which request each token belongs to, its write
    mask, the requests' states). Opaque to torch.compile, as vLLM's attention op is: the graph
    around it (projections, corrections) is compiled once for every batch. The read-out is
    inside because at decode the kernel's own loop beats a GEMM call (`READ_OUT_IN_KERNEL`)."""
    return _RUNTIMES[runtime].scan_layer(slot, proj, bias)


def _deltamem_scan_fake(proj, bias, runtime, slot) -> torch.Tensor:
    lin, _, dtype = _RUNTIMES[runtime]._read_out[slot]
    return proj.new_empty((proj.shape[0], 0 if lin is None else lin.weight.shape[0]),
                          dtype=dtype)


# Registered on a Library directly, not with torch.library.custom_op, whose dispatch costs tens
# of microseconds a call (vLLM registers its own ops this way for the same reason).
_LIB = torch.library.Library("deltamem", "FRAGMENT")
_LIB.define("scan(Tensor proj, Tensor bias, int runtime, int slot) -> Tensor")
_LIB.impl("scan", deltamem_scan, "CompositeExplicitAutograd")
_LIB._register_fake("scan", _deltamem_scan_fake)


def _linear_map(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
                ) -> torch.nn.Module:
    """x ↦ x Wᵀ + b as a module of buffers; in bfloat16 on the CPU through vLLM's own CPU
    GEMM dispatch (prepacked weights), which vLLM's linear layers use too."""
    lin = torch.nn.Module()
    lin.register_buffer("weight", weight.to(dtype).contiguous(), persistent=False)
    lin.register_buffer("bias", None if bias is None else bias.to(dtype), persistent=False)
    if weight.device.type == "cpu" and dtype == torch.bfloat16:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(lin, remove_weight=False)
    return lin


def _apply(lin: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    f = getattr(lin, "cpu_linear", None)
    if f is not None:
        return f(x, lin.weight, lin.bias)
    return torch.nn.functional.linear(x, lin.weight, lin.bias)


def _empty(rows: int, cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised CPU tensor and its numpy view (bfloat16: int16 bit patterns), made by
    numpy and wrapped: half the cost of torch.empty and `_numpy`, which counts at decode."""
    bf16 = dtype == torch.bfloat16
    a = np.empty((rows, cols), dtype=np.int16 if bf16 else np.float32)
    t = torch.from_numpy(a)
    return (t.view(torch.bfloat16) if bf16 else t), a


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy, without a copy: bfloat16 as its bit patterns (int16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def memory_corrections(self, x: torch.Tensor, proj: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Δq and Δo of one layer for the step's tokens x (the normed layer input), in the packed
    weights' dtype: the same math as DeltaMemLayer.project / delta_q / delta_o (the HF
    runtime's) on the weights `DeltaMemRuntime.install` packed: the projections, then the
    `deltamem::scan` op (activations and scan in float32, the read-out). `proj`: x's
    projections, (n, 4m) without their bias, where the layer's qkv_proj computed them
    (`fuse_projection`). Per layer the graph holds the op and, unfused, one GEMM."""
    if proj is None:
        lin = self.deltamem_in
        proj = _apply(lin, x.to(lin.weight.dtype))
    # Compiled: the op, opaque to the compiler. Eager: its body, as the op's dispatch would
    # cost more than a decode step's scan.
    scan = torch.ops.deltamem.scan if torch.compiler.is_compiling() else deltamem_scan
    dqo = scan(proj, self.deltamem_in_bias, self.deltamem_runtime_id, self.deltamem_slot)
    q_out = self.deltamem_q_out
    return (dqo[:, :q_out] if q_out else None,
            dqo[:, q_out:] if self.deltamem_out_width > q_out else None)


def _attention_forward(self, positions: torch.Tensor, hidden_states: torch.Tensor):
    """LlamaAttention / Qwen3Attention forward plus Δq (before q_norm and RoPE) and Δo.

    `hidden_states` is the normed layer input, i.e. the δ-mem x_t; the paged attention and KV
    cache are vLLM's own, untouched."""
    qkv, _ = self.qkv_proj(hidden_states)
    # Fused (`fuse_projection`): the δ-mem projections are qkv_proj's last columns.
    proj = None if self.deltamem_in is not None else qkv[..., self.q_size + 2 * self.kv_size:]
    q, k, v = qkv[..., :self.q_size + 2 * self.kv_size].split(
        [self.q_size, self.kv_size, self.kv_size], dim=-1)
    dq, do = memory_corrections(self, hidden_states, proj)
    if dq is not None:
        q = q + dq.to(q.dtype)
    if hasattr(self, "q_norm"):  # Qwen3: per-head RMSNorm on q and k before RoPE
        q = self.q_norm(q.view(*q.shape[:-1], -1, self.head_dim)).view(q.shape)
        k = self.k_norm(k.view(*k.shape[:-1], -1, self.head_dim)).view(k.shape)
    q, k = self.rotary_emb(positions, q, k)
    attn_output = self.attn(q, k, v)
    output, _ = self.o_proj(attn_output)
    if do is not None:
        output = output + do.to(output.dtype)
    return output


def fuse_projection(attn: torch.nn.Module) -> bool:
    """Move a layer's δ-mem projections into its qkv_proj, as 4m more output rows: one GEMM
    for both instead of two (a decode step's GEMMs cost per call more than per row). Before
    vLLM packs the weights (`process_weights_after_loading`), which then packs the joined
    matrix as it would the backbone's own. Only where qkv_proj is a plain unquantized matrix
    on one rank; elsewhere (False) the layer keeps its own δ-mem GEMM."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    qkv = attn.qkv_proj
    lin = attn.deltamem_in
    w = getattr(qkv, "weight", None)
    if (type(qkv.quant_method) is not UnquantizedLinearMethod or qkv.tp_size != 1
            or not isinstance(w, torch.Tensor) or w.ndim != 2 or w.is_meta
            or w.dtype != lin.weight.dtype or w.shape[1] != lin.weight.shape[1]
            or w.shape[0] != attn.q_size + 2 * attn.kv_size):
        return False
    m4 = lin.weight.shape[0]
    with torch.no_grad():
        qkv.weight = torch.nn.Parameter(torch.cat([w.data, lin.weight]), requires_grad=False)
        if qkv.bias is not None:
            qkv.bias = torch.nn.Parameter(torch.cat([qkv.bias.data, torch.zeros(
                m4, dtype=qkv.bias.dtype, device=qkv.bias.device)]), requires_grad=False)
    attn.deltamem_in = None
    return True


_ATTENTION_CLASSES: dict[type, type] = {}


def _with_memory(attn_cls: type) -> type:
    """The δ-mem subclass of a vLLM attention class (a real class, not a patched instance
    method, so torch.compile traces it as it traces any module)."""
    if attn_cls not in _ATTENTION_CLASSES:
        _ATTENTION_CLASSES[attn_cls] = type(f"DeltaMem{attn_cls.__name__}", (attn_cls,),
                                            {"forward": _attention_forward})
    return _ATTENTION_CLASSES[attn_cls]


def _keep_freed_memory() -> None:
    """Stop glibc's malloc, in this (worker) process, from giving freed memory back and
    faulting it in again. A δ-mem layer adds a few megabyte-sized temporaries per layer and
    step (projections, reads, the read-out's output); among the backbone's, they made glibc
    trim the heap top and mmap chunks afresh every step: a 2,048-token prefill spent about
    5% of its time in page faults (perf: exc_page_fault from the first writes to new
    buffers), plain vLLM's none. Keeping up to 256 MB freed, and a fixed 32 MB mmap
    threshold (instead of one that moves with each free), removes them. Only on glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        libc.mallopt(m_trim_threshold, 256 << 20)
        libc.mallopt(m_mmap_threshold, 32 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class _DeltaMemMixin:
    """Turns a vLLM Llama/Qwen3 causal LM into its δ-mem variant.

    The adapter is read in `load_weights` (after the backbone, whose W_Q/W_O an untrained
    adapter would need) from the path in the HF config's `deltamem_adapter`, which the facade
    sets through `hf_overrides`. The δ-mem module is kept off the nn.Module tree so vLLM's
    weight loader never looks for it in the backbone checkpoint.
    """

    deltamem_runtime: DeltaMemRuntime | None = None

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        sched = vllm_config.scheduler_config
        self._deltamem_max_seqs = sched.max_num_seqs
        self._deltamem_max_tokens = sched.max_num_batched_tokens

    def _deltamem_setup(self) -> None:
        path = getattr(self.config, "deltamem_adapter", None)
        if not path:
            raise ValueError("δ-mem model class selected without `deltamem_adapter` in "
                             "hf_overrides")
        adapter: Adapter = load_adapter(path, self.config)
        device = next(self.parameters()).device
        # The pool and the token buffers sized once, for the engine's batch and token budget
        # (what a captured CUDA graph reads must never move).
        rt = DeltaMemRuntime(adapter.module, device, max_requests=self._deltamem_max_seqs,
                             max_tokens=self._deltamem_max_tokens)
        self.deltamem_runtime = rt
        if device.type == "cpu":
            _keep_freed_memory()
        for i in rt.layer_ids:
            attn = self.model.layers[i].self_attn
            rt.install(attn, i, dtype=attn.qkv_proj.weight.dtype)
            attn.__class__ = _with_memory(type(attn))
        fused = sum(fuse_projection(self.model.layers[i].self_attn) for i in rt.layer_ids)
        rt.fused_projections = fused
        # Throwaway steps through the path a request takes, so that the CPU kernel compiles
        # now (for the strided views of qkv_proj's output it is called with, and both of its
        # read-out paths), not in a request.
        attn = self.model.layers[rt.layer_ids[0]].self_attn
        dtype = attn.qkv_proj.weight.dtype
        with torch.inference_mode():
            for n in (1, READ_OUT_IN_KERNEL + 1):
                x = torch.zeros(n, adapter.config.hidden_size, device=device, dtype=dtype)
                proj = None
                if attn.deltamem_in is None:
                    qkv = torch.zeros(n, attn.qkv_proj.weight.shape[0], device=device,
                                      dtype=dtype)
                    proj = qkv[:, attn.q_size + 2 * attn.kv_size:]
                rt.begin_forward(n)
                memory_corrections(attn, x, proj)
                rt.end_forward()
        log.info("δ-mem adapter %s loaded on %d layers (%d parameters; projections in "
                 "qkv_proj on %d)", adapter.fingerprint(), len(rt.layer_ids),
                 adapter.module.num_parameters(), fused)

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        self._deltamem_setup()
        return loaded

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        rt = self.deltamem_runtime
        if not rt.step_open:  # no step begun by the runner hook: a warm-up or capture run
            rt.begin_forward(int(positions.shape[-1]))
        try:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                                   **kwargs)
        finally:
            rt.end_forward()


def _model_classes():
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    class DeltaMemLlamaForCausalLM(_DeltaMemMixin, LlamaForCausalLM):
        pass

    class DeltaMemQwen3ForCausalLM(_DeltaMemMixin, Qwen3ForCausalLM):
        pass

    return {"DeltaMemLlamaForCausalLM": DeltaMemLlamaForCausalLM,
            "DeltaMemQwen3ForCausalLM": DeltaMemQwen3ForCausalLM}


class DeltaMemWorkerExtension:
    """Mixed into vLLM's worker (worker_extension_cls): the API process's way in."""

    def deltamem_take_states(self, req_ids: list[str], positions: dict[str, int] | None = None
                             ) -> dict[str, dict]:
        rt = getattr(self.model_runner.get_model(), "deltamem_runtime", None)
        return {} if rt is None else rt.take_states(req_ids, positions)

    def deltamem_stats(self) -> dict:
        rt = getattr(self.model_runner.get_model(), "deltamem_runtime", None)
        if rt is None:
            return {"enabled": False}
        return {"enabled": True, "active_requests": len(rt.requests), "outbox": len(rt.outbox),
                "recomputes": rt.recomputes, "moved_out": rt.moved_out,
                "fused_projections": rt.fused_projections,
                "states_before_latest": rt.states_before_latest}
