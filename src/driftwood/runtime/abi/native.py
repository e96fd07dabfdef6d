"""The native host ABI, import module ``driftwood`` (guests/include/driftwood.h).

Tensors are guest memory: the accelerator reads and writes the guest's bytes in place
through the actor's backend (torch views on the CPU, mapped pinned memory on CUDA). Sessions
are per actor: the handle table lives in this module's instance, so one actor can never
name another's sessions.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from driftwood.errors import DriftwoodError, ModelError
from driftwood.runtime.actor import DeadlineExceeded
from driftwood.runtime.hostcall import DW_EINVAL, GuestFault, HostModule, export
from driftwood.runtime.models import Handles, ModelPool

if TYPE_CHECKING:
    from driftwood.model import Model, Session
    from driftwood.runtime.actor import Actor

MAX_GEMM_DIM = 8192
PREFILL_CHUNK = 256  # tokens per forward in dw_append: the deadline is checked between chunks

DW_EBADF = -4
DW_ENOMODEL = -5
DW_ECONTEXT = -6
DW_ELIMIT = -7
DW_EMODEL = -8
DW_ESNAPSHOT = -9

TOKENIZE_ADD_BOS = 1
TOKENIZE_PARSE_SPECIAL = 2

_SAMPLING = struct.Struct("<fifffi")  # dw_sampling_t, 24 bytes
_INFO = struct.Struct("<6i")  # dw_session_info_t


@dataclass(frozen=True)
class SessionLimits:
    """What one actor may hold in sessions (their KV caches live outside its linear memory)."""

    max_sessions: int = 8
    max_tokens: int = 32768  # sum of the capacities of its open sessions
    default_capacity: int = 4096


@dataclass(frozen=True)
class GemmRecord:
    """Addresses of the last GEMM: where the guest's buffers are, and what the device used."""

    guest_addresses: tuple[int, int, int]  # host virtual addresses of a, b, c in the arena
    device_addresses: tuple[int, int, int]  # data_ptr() of the tensors the kernel ran on
    shape: tuple[int, int, int]

    @property
    def zero_copy(self) -> bool:
        return self.guest_addresses == self.device_addresses


class _Entry:
    """A guest-visible session: the engine's session plus what the ABI keeps beside it."""

    def __init__(self, name: str, model: Model, session: Session) -> None:
        self.name = name
        self.model = model
        self.session = session
        self.logits: torch.Tensor | None = None  # next-token logits (maybe a view of guest memory)
        self.stream = model.tokenizer.detokenizer()
        self.pending = b""  # streamed text that did not fit the guest's buffer yet


def _overlaps(p: int, n: int, q: int, m: int) -> bool:
    return p < q + m and q < p + n


class NativeABI(HostModule):
    module = "driftwood"
    propagate = (DeadlineExceeded,)

    def __init__(self, actor: Actor, pool: ModelPool | None = None, limits: SessionLimits | None = None) -> None:
        super().__init__()
        self.actor = actor
        self.pool = pool or ModelPool(actor.backend.device.type)
        self.limits = limits or SessionLimits()
        self.sessions: Handles[_Entry] = Handles(first=1, limit=self.limits.max_sessions)
        self.last_gemm: GemmRecord | None = None
        self.resumed = False
        self.snapshot_hook: Any = None  # set by the snapshot layer: callable(actor) -> None
        self.session_snapshots: Any = None  # set by the snapshot layer: .save/.load/.rewound
        self._last_sampling: tuple[bytes, Any] = (b"", None)  # (dw_sampling_t bytes, parsed)

    # -- compute ---------------------------------------------------------------------------

    @export("gemm_f32", "ptr ptr ptr i32 i32 i32")
    def gemm_f32(self, a: int, b: int, c: int, m: int, n: int, k: int) -> int:
        if not all(1 <= d <= MAX_GEMM_DIM for d in (m, n, k)):
            raise GuestFault(DW_EINVAL, f"gemm dimensions {m}x{n}x{k} outside [1, {MAX_GEMM_DIM}]")
        mem = self.mem
        ta = mem.tensor(a, (m, k), torch.float32, device=True)
        tb = mem.tensor(b, (k, n), torch.float32, device=True)
        tc = mem.tensor(c, (m, n), torch.float32, device=True)
        if _overlaps(c, 4 * m * n, a, 4 * m * k) or _overlaps(c, 4 * m * n, b, 4 * k * n):
            raise GuestFault(DW_EINVAL, "gemm output overlaps an input")
        torch.matmul(ta, tb, out=tc)
        mem.backend.synchronize()
        base = mem.arena.base
        self.last_gemm = GemmRecord(
            guest_addresses=(base + a, base + b, base + c),
            device_addresses=(ta.data_ptr(), tb.data_ptr(), tc.data_ptr()),
            shape=(m, n, k),
        )
        return 0

    # -- sessions --------------------------------------------------------------------------

    def entry(self, handle: int) -> _Entry:
        entry = self.sessions.get(handle)
        if entry is None:
            raise GuestFault(DW_EBADF, f"no session {handle}")
        return entry

    def open_tokens(self) -> int:
        return sum(e.session.capacity for _, e in self.sessions.items())

    @export("session_open", "ptr u32 u32 u32")
    def session_open(self, name_ptr: int, name_len: int, capacity: int, seed: int) -> int:
        if name_len > 4096:
            raise GuestFault(DW_EINVAL, "model name longer than 4096 bytes")
        name = self.mem.read_str(name_ptr, name_len)
        if name not in self.pool:
            raise GuestFault(DW_ENOMODEL, f"no model named {name!r}")
        if len(self.sessions) >= self.limits.max_sessions:
            raise GuestFault(DW_ELIMIT, f"at most {self.limits.max_sessions} open sessions")
        try:
            model = self.pool.get(name)
        except ModelError as exc:
            raise GuestFault(DW_EMODEL, str(exc)) from exc
        ctx = model.config.context_length
        capacity = capacity or min(self.limits.default_capacity, ctx)
        if capacity > ctx:
            raise GuestFault(DW_EINVAL, f"capacity {capacity} exceeds the model's context of {ctx}")
        if self.open_tokens() + capacity > self.limits.max_tokens:
            raise GuestFault(DW_ELIMIT, f"sessions may hold at most {self.limits.max_tokens} tokens in all")
        session = model.new_session(capacity=capacity, seed=seed)
        return self.sessions.add(_Entry(name, model, session))

    @export("session_close", "i32")
    def session_close(self, handle: int) -> int:
        entry = self.sessions.pop(handle)
        if entry is None:
            raise GuestFault(DW_EBADF, f"no session {handle}")
        entry.session.close()
        return 0

    @export("session_info", "i32 ptr")
    def session_info(self, handle: int, out: int) -> int:
        entry = self.entry(handle)
        tok = entry.model.tokenizer
        s = entry.session
        info = _INFO.pack(s.position, s.capacity, entry.model.config.vocab_size,
                          entry.model.config.context_length, _or_minus1(tok.bos_id), _or_minus1(tok.eos_id))
        self.mem.check(out, len(info), 4)
        self.mem.write(out, info)
        return 0

    @export("session_reset", "i32")
    def session_reset(self, handle: int) -> int:
        entry = self.entry(handle)
        entry.session.reset()
        self._rewound(entry, 0)
        entry.logits = None
        entry.stream = entry.model.tokenizer.detokenizer()
        entry.pending = b""
        return 0

    @export("session_truncate", "i32 u32")
    def session_truncate(self, handle: int, n: int) -> int:
        entry = self.entry(handle)
        if n > entry.session.position:
            raise GuestFault(DW_EINVAL, f"cannot truncate {entry.session.position} tokens to {n}")
        if n < entry.session.position:
            entry.session.truncate(n)
            self._rewound(entry, n)
            entry.logits = None
        return n

    # -- text ------------------------------------------------------------------------------

    @export("tokenize", "i32 ptr u32 u32 ptr u32")
    def tokenize(self, handle: int, text_ptr: int, text_len: int, flags: int, ids_ptr: int, max_ids: int) -> int:
        entry = self.entry(handle)
        if flags & ~(TOKENIZE_ADD_BOS | TOKENIZE_PARSE_SPECIAL):
            raise GuestFault(DW_EINVAL, f"unknown tokenize flags {flags:#x}")
        text = self.mem.read_str(text_ptr, text_len)
        ids = entry.model.tokenizer.encode(text, add_bos=bool(flags & TOKENIZE_ADD_BOS),
                                           parse_special=bool(flags & TOKENIZE_PARSE_SPECIAL))
        return self._write_i32s(ids_ptr, max_ids, ids)

    @export("detokenize", "i32 ptr u32 ptr u32")
    def detokenize(self, handle: int, ids_ptr: int, n_ids: int, out: int, max_len: int) -> int:
        entry = self.entry(handle)
        ids = self._read_ids(entry, ids_ptr, n_ids)
        return self._write_bytes(out, max_len, entry.model.tokenizer.decode(ids).encode())

    @export("token_text", "i32 i32 ptr u32")
    def token_text(self, handle: int, token: int, out: int, max_len: int) -> int:
        """Streamed text for ``token`` (or, for token -1, everything held back).

        Text that does not fit ``max_len`` is kept and returned first by the next call, cut
        at a UTF-8 character boundary, so nothing is lost or split whatever the buffer size.
        """
        entry = self.entry(handle)
        if token != -1:
            self._check_token(entry, token)
        self.mem.check(out, max_len)  # refuse a bad buffer before consuming the token
        if token == -1:
            text = entry.pending + entry.stream.flush().encode()
        else:
            text = entry.pending + entry.stream.add(token).encode()
        cut = _utf8_cut(text, max_len)
        entry.pending = text[cut:]
        self.mem.write(out, text[:cut])
        return cut

    @export("is_end", "i32 i32")
    def is_end(self, handle: int, token: int) -> int:
        entry = self.entry(handle)
        self._check_token(entry, token)
        return int(token in entry.model.tokenizer.stop_ids)

    @export("chat_template", "i32 ptr u32 i32 ptr u32")
    def chat_template(self, handle: int, json_ptr: int, json_len: int, add_prompt: int, out: int, max_len: int) -> int:
        entry = self.entry(handle)
        try:
            messages = json.loads(self.mem.read_str(json_ptr, json_len))
        except json.JSONDecodeError as exc:
            raise GuestFault(DW_EINVAL, f"messages are not JSON: {exc}") from exc
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise GuestFault(DW_EINVAL, 'messages must be a JSON array of {"role": str, "content": str}')
        try:
            prompt = entry.model.tokenizer.chat_prompt(messages, add_generation_prompt=bool(add_prompt))
        except DriftwoodError as exc:
            raise GuestFault(DW_EINVAL, str(exc)) from exc
        return self._write_bytes(out, max_len, prompt.encode())

    # -- inference -------------------------------------------------------------------------

    @export("append", "i32 ptr u32 ptr u32")
    def append(self, handle: int, ids_ptr: int, n_ids: int, logits_ptr: int, vocab: int) -> int:
        entry = self.entry(handle)
        if n_ids == 0:
            raise GuestFault(DW_EINVAL, "nothing to append")
        ids = self._read_ids(entry, ids_ptr, n_ids)
        out = self._logits_view(entry, logits_ptr, vocab)
        session = entry.session
        if session.position + len(ids) > session.capacity:
            raise GuestFault(DW_ECONTEXT, f"session holds {session.capacity} tokens, "
                                          f"{session.position + len(ids)} needed")
        if len(ids) == 1:
            logits = session.decode(ids[0], logits_out=out)
        else:
            for start in range(0, len(ids), PREFILL_CHUNK):
                self.actor.check_deadline()
                logits = session.prefill(ids[start : start + PREFILL_CHUNK])
            if out is not None:
                out.copy_(logits)
                logits = out
        if out is not None:  # the guest reads its buffer as soon as the call returns
            self.mem.backend.synchronize()
        entry.logits = logits
        self.actor.check_deadline()
        return session.position

    @export("sample", "i32 ptr")
    def sample(self, handle: int, params_ptr: int) -> int:
        entry = self.entry(handle)
        return self._sample(entry, self._read_sampling(params_ptr))

    @export("generate", "i32 ptr")
    def generate(self, handle: int, params_ptr: int) -> int:
        entry = self.entry(handle)
        params = self._read_sampling(params_ptr)
        session = entry.session
        if session.position + 1 > session.capacity:
            raise GuestFault(DW_ECONTEXT, f"session is full ({session.capacity} tokens)")
        token = self._sample(entry, params)
        entry.logits = session.decode(token)
        self.actor.check_deadline()
        return token

    # -- snapshots (wired by driftwood.snapshot when the actor has a snapshot directory) ---

    @export("snapshot", "")
    def snapshot(self) -> int:
        if self.snapshot_hook is None:
            raise GuestFault(DW_ESNAPSHOT, "this actor runs without a snapshot directory")
        try:
            self.snapshot_hook(self.actor)
        except DriftwoodError as exc:
            raise GuestFault(DW_ESNAPSHOT, str(exc)) from exc
        return 0

    @export("resumed", "")
    def resumed_(self) -> int:
        return int(self.resumed)

    @export("session_save", "i32 ptr u32")
    def session_save(self, handle: int, name_ptr: int, name_len: int) -> int:
        entry = self.entry(handle)
        name = self._snapshot_name(name_ptr, name_len)
        try:
            self.session_snapshots.save(self, handle, entry, name)
        except DriftwoodError as exc:
            raise GuestFault(DW_ESNAPSHOT, str(exc)) from exc
        return 0

    @export("session_load", "ptr u32")
    def session_load(self, name_ptr: int, name_len: int) -> int:
        name = self._snapshot_name(name_ptr, name_len)
        if len(self.sessions) >= self.limits.max_sessions:
            raise GuestFault(DW_ELIMIT, f"at most {self.limits.max_sessions} open sessions")
        try:
            return int(self.session_snapshots.load(self, name))
        except GuestFault:
            raise
        except DriftwoodError as exc:
            raise GuestFault(DW_ESNAPSHOT, str(exc)) from exc

    def adopt(self, handle: int | None, name: str, model: Model, session: Session,
              logits: torch.Tensor | None) -> int:
        """Give the guest a restored session: under ``handle`` (restoring a whole actor), or
        under a new handle (None). Returns the handle."""
        entry = _Entry(name, model, session)
        entry.logits = logits
        if handle is None:
            return self.sessions.add(entry)
        self.sessions.put(handle, entry)
        return handle

    def _snapshot_name(self, ptr: int, n: int) -> str:
        if self.session_snapshots is None:
            raise GuestFault(DW_ESNAPSHOT, "this actor runs without a snapshot directory")
        if not 0 < n <= 64:
            raise GuestFault(DW_EINVAL, "a snapshot name has 1 to 64 bytes")
        name = self.mem.read_str(ptr, n)
        if not (name[0].isascii() and name[0].isalnum()) or not all(
                c.isascii() and (c.isalnum() or c in "._-") for c in name):
            raise GuestFault(DW_EINVAL, "a snapshot name is letters, digits and '._-', starting alphanumeric")
        return name

    def _rewound(self, entry: _Entry, position: int) -> None:
        """Keys and values from ``position`` on will be recomputed: tell the snapshot layer,
        so that its next save stores them instead of reusing chunks saved before."""
        if self.session_snapshots is not None:
            self.session_snapshots.rewound(entry.session, position)

    # -- helpers ---------------------------------------------------------------------------

    def close(self) -> None:
        for handle, entry in self.sessions.items():
            entry.session.close()
            self.sessions.pop(handle)

    def _check_token(self, entry: _Entry, token: int) -> None:
        if not 0 <= token < entry.model.config.vocab_size:
            raise GuestFault(DW_EINVAL, f"token {token} outside the vocabulary of {entry.model.config.vocab_size}")

    def _read_ids(self, entry: _Entry, ptr: int, n: int) -> list[int]:
        if n > entry.session.capacity:
            raise GuestFault(DW_ECONTEXT, f"{n} tokens exceed the session's capacity of {entry.session.capacity}")
        self.mem.check(ptr, 4 * n, 4)
        ids = self.mem.tensor(ptr, n, torch.int32).tolist()
        vocab = entry.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise GuestFault(DW_EINVAL, f"token ids must lie in [0, {vocab})")
        return ids

    def _logits_view(self, entry: _Entry, ptr: int, vocab: int) -> torch.Tensor | None:
        if ptr == 0:
            return None
        if vocab != entry.model.config.vocab_size:
            raise GuestFault(DW_EINVAL, f"logits buffer holds {vocab} floats, the vocabulary is "
                                        f"{entry.model.config.vocab_size}")
        return self.mem.tensor(ptr, vocab, torch.float32, device=True)

    def _read_sampling(self, ptr: int) -> Any:
        self.mem.check(ptr, _SAMPLING.size, 4)
        raw = self.mem.read(ptr, _SAMPLING.size)
        if raw != self._last_sampling[0]:  # agents pass the same parameters token after token
            self._last_sampling = (raw, self._parse_sampling(raw))
        return self._last_sampling[1]

    @staticmethod
    def _parse_sampling(raw: bytes) -> Any:
        from driftwood.model import SamplingParams

        temperature, top_k, top_p, min_p, penalty, last_n = _SAMPLING.unpack(raw)
        values = (temperature, top_p, min_p, penalty)
        if not all(v == v and abs(v) != float("inf") for v in values):  # NaN or inf
            raise GuestFault(DW_EINVAL, "sampling parameters must be finite")
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or not 0 <= min_p <= 1 or penalty <= 0 or last_n < 0:
            raise GuestFault(DW_EINVAL, "sampling parameters out of range")
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=penalty, repeat_last_n=last_n)

    def _sample(self, entry: _Entry, params: Any) -> int:
        if entry.logits is None:
            raise GuestFault(DW_EINVAL, "no logits yet: append tokens first")
        logits = entry.logits
        if self._in_guest_memory(logits):  # the guest may have written anything there
            if logits.device != entry.model.device:
                logits = logits.to(entry.model.device)
            if not torch.isfinite(logits).any():
                raise GuestFault(DW_EINVAL, "the logits hold no finite value")
            logits = torch.nan_to_num(logits.float(), nan=float("-inf"))
        # the engine's own logits need no check (and a check would cost a device sync a token)
        return entry.session.sample(logits, params)

    def _in_guest_memory(self, t: torch.Tensor) -> bool:
        arena = self.mem.arena
        return arena.base <= t.data_ptr() < arena.base + arena.reserved

    def _write_i32s(self, ptr: int, max_count: int, values: list[int]) -> int:
        if len(values) <= max_count:
            self.mem.check(ptr, 4 * len(values), 4)
            if values:
                self.mem.tensor(ptr, len(values), torch.int32).copy_(torch.tensor(values, dtype=torch.int32))
        return len(values)

    def _write_bytes(self, ptr: int, max_len: int, data: bytes) -> int:
        if len(data) <= max_len:
            self.mem.write(ptr, data)
        return len(data)


def _utf8_cut(data: bytes, limit: int) -> int:
    """The longest prefix length <= limit that ends on a UTF-8 character boundary."""
    if len(data) <= limit:
        return len(data)
    cut = limit
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # data[cut] continues a character
        cut -= 1
    return cut


def _or_minus1(value: int | None) -> int:
    return -1 if value is None else value
