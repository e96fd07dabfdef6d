"""WasmEdge's wasi-nn ABI, import module ``wasi_ephemeral_nn``, as its GGML backend speaks it.

Guests built for WasmEdge (LlamaEdge, WasmEdge-WASINN-examples, anything compiled against the
``wasmedge-wasi-nn`` crate) run unmodified: the same twelve functions with the same parameter
order, handle numbering from 0, tensor and builder layouts, errno values, metadata keys and
output JSON (see docs/wasi-nn.md and wasi_nn_options.py).

Where Driftwood differs on purpose:

* every execution context owns its own engine session (KV cache, tokens, RNG), so two
  contexts of one graph never disturb each other; there is no per-graph mutex;
* the opt-in context key ``"keep-kv-cache": true`` keeps the KV cache across computes: the
  next compute reuses the longest common prefix of the previous tokens and the new prompt,
  so a chat that resends the whole conversation prefills only what is new;
* ``load`` with ``preload:<path>`` opens only files the host registered (``--nn-preload``),
  never an arbitrary host path; raw GGUF bytes go to a private temporary file;
* a refused metadata document changes nothing; get_output never writes past the buffer;
* resources are bounded per actor (graphs, contexts, prompt, metadata and model sizes) and
  inference stops at the next token boundary once the actor's deadline passes.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from driftwood.errors import ModelError
from driftwood.runtime.abi.wasi_nn_options import (
    BUSY,
    CONTEXT_FULL,
    END_OF_SEQUENCE,
    INVALID_ARGUMENT,
    INVALID_ENCODING,
    MAX_METADATA_BYTES,
    MISSING_MEMORY,
    MODEL_NOT_FOUND,
    NOT_FOUND,
    PROMPT_TOO_LONG,
    RANDOM_SEED,
    RUNTIME_ERROR,
    SUCCESS,
    TOO_LARGE,
    ContextOptions,
    GraphOptions,
    Update,
    parse_metadata,
)
from driftwood.runtime.actor import DeadlineExceeded
from driftwood.runtime.hostcall import GuestFault, GuestMemory, HostModule, export
from driftwood.runtime.models import Handles, ModelPool

if TYPE_CHECKING:
    from driftwood.model import Model, SamplingParams, Session
    from driftwood.runtime.actor import Actor

log = logging.getLogger(__name__)

GGML = 6  # graph encodings 0..6: OpenVINO, ONNX, TF, PyTorch, TFLite, Autodetect, GGML
N_ENCODINGS = 7
N_TARGETS = 4  # CPU, GPU, TPU, AUTO
TENSOR_TYPES = frozenset({0, 1, 3, 4})  # F16, F32, U8, I32: what WasmEdge's set_input admits
TENSOR = struct.Struct("<5I")  # dims_ptr, dims_len, type, data_ptr, data_len
BUILDER = struct.Struct("<2I")  # ptr, len
PRELOAD = b"preload:"

MAX_HANDLES = 16  # open graphs, and open contexts, per actor
MAX_PROMPT_BYTES = 1 << 20  # far beyond any context the engine allocates
MAX_NAME_BYTES = 4096
MAX_BUILDERS = 16
MAX_MODEL_BYTES = 1 << 30  # raw GGUF bytes a guest may hand to `load`
MAX_KV_BYTES = 2 << 30  # KV cache memory of all of an actor's contexts together
PREFILL_CHUNK = 128  # tokens per prefill step: the deadline is checked between steps
LLAMA_BUILD_NUMBER = 0  # output-1 JSON fields WasmEdge fills from llama.cpp
LLAMA_COMMIT = "driftwood"


@dataclass(eq=False)
class Graph:
    """A loaded model and its settings; ``defaults`` seed each new context's own settings."""

    model: Model
    options: GraphOptions
    defaults: ContextOptions
    name: str | None = None  # the load_by_name cache entry
    scratch: Path | None = None  # GGUF bytes a guest passed to `load`, removed with the graph
    live: bool = True  # False once unloaded: its contexts may still drain their output


class ExecutionContext:
    """One wasi-nn execution context: its own engine session, prompt and output.

    A generation is the engine's token generator (:func:`generate_tokens`) driven one token
    per step: ``begin`` is WasmEdge's clearContext + evaluateInput, ``step`` its sampleOutput
    checks (reverse prompt, end-of-generation, full context, in that order).
    """

    def __init__(self, graph: Graph, kv_budget: Callable[[ExecutionContext, int], None]) -> None:
        self.graph = graph
        self._kv_budget = kv_budget  # raises GuestFault if a session of this many tokens does not fit
        self.options = replace(graph.defaults)
        self.session: Session | None = None
        self.inputs: list[int] | None = None  # prompt tokens from set_input(0)
        self.tokens: list[int] = []  # output tokens since the last compute
        self.text = ""  # output text since the last compute (complete UTF-8 only)
        self.piece = ""  # the last token's text, for get_output_single
        self.streaming = False  # compute_single has evaluated the prompt
        self.cached = 0  # prompt tokens the last compute reused from the KV cache
        self.prefilled = 0  # prompt tokens the last compute evaluated
        self._generator: Iterator[int] | None = None
        self._detok = graph.model.tokenizer.detokenizer(skip_special=False)

    def _open_session(self) -> Session:
        model = self.graph.model
        want = min(self.graph.options.ctx_size or model.default_capacity, model.config.context_length)
        if self.session is not None and self.session.capacity != want:
            self.session.close()
            self.session = None
        if self.session is None:
            self._kv_budget(self, want)
            seed = self.graph.options.seed
            self.session = model.new_session(capacity=want, seed=None if seed == RANDOM_SEED else seed)
        return self.session

    def _clear_output(self) -> None:
        self.tokens = []
        self.text = ""
        self.piece = ""
        self._generator = None
        self._detok = self.graph.model.tokenizer.detokenizer(skip_special=False)

    def begin(self, check_deadline: Callable[[], None], max_tokens: int) -> None:
        """Start a generation of up to ``max_tokens`` (negative: no limit): clear the output,
        evaluate the prompt (with keep-kv-cache only the part not already cached) but its last
        chunk, which the generator evaluates on its first step. Raises GuestFault 1 (no
        prompt) or 102 (the prompt leaves no room)."""
        from driftwood.model.generate import generate_tokens

        self._clear_output()
        self.cached = self.prefilled = 0
        if not self.inputs:
            raise GuestFault(INVALID_ARGUMENT, "no prompt: call set_input(ctx, 0, ...) first")
        session = self._open_session()
        room = max(session.capacity - 4, 0)  # WasmEdge keeps 4 tokens for specials
        if len(self.inputs) > room:
            raise GuestFault(PROMPT_TOO_LONG, f"the prompt has {len(self.inputs)} tokens, at most {room} fit")
        keep = 0
        if self.options.keep_kv_cache:  # the last prompt token is always evaluated: it gives the logits
            keep = min(_common_prefix(session.tokens, self.inputs), len(self.inputs) - 1)
        _rewind(session, keep)
        options = self.graph.options
        if options.seed != RANDOM_SEED:  # llama.cpp reseeds its sampler for every generation
            session.generator.manual_seed(options.seed)
        suffix = self.inputs[keep:]
        chunk = max(1, min(options.batch_size, PREFILL_CHUNK))
        last = (len(suffix) - 1) // chunk * chunk
        for i in range(0, last, chunk):
            check_deadline()
            session.prefill(suffix[i : i + chunk])
        self.cached, self.prefilled = keep, len(suffix)
        stops = () if options.ignore_eos else self.graph.model.tokenizer.stop_ids
        limit = max_tokens if max_tokens >= 0 else sys.maxsize
        self._generator = generate_tokens(session, suffix[last:], _sampling(options, session.capacity),
                                          limit, stops)

    def step(self, check_deadline: Callable[[], None], write: Callable[[bytes], None] | None,
             *, single: bool) -> int | None:
        """Generate one token: 0, 100 (end-of-generation or reverse prompt), 101 (the context
        is full), or None when the generation's token budget is spent."""
        assert self._generator is not None and self.session is not None
        check_deadline()
        token = next(self._generator, None)
        if token is None:
            return None
        self.tokens.append(token)
        self.piece = self._detok.add(token)
        self.text += self.piece
        if not single:  # as in WasmEdge, compute_single neither streams nor watches for a reverse prompt
            if self.options.stream_stdout and self.piece and write is not None:
                write(self.piece.encode())
            stop = self.options.reverse_prompt
            if stop and self.text.find(stop, max(0, len(self.text) - len(self.piece) - len(stop))) >= 0:
                return END_OF_SEQUENCE
        if not self.graph.options.ignore_eos and token in self.graph.model.tokenizer.stop_ids:
            return END_OF_SEQUENCE
        if self.session.position >= self.session.capacity:  # no room to evaluate this token
            return CONTEXT_FULL
        return SUCCESS

    def end(self) -> str:
        """A generation stopped: release the text the detokenizer held back (an incomplete
        UTF-8 sequence becomes U+FFFD, as in the output); returns it."""
        self._generator = None
        rest = self._detok.flush()
        self.text += rest
        self.piece += rest
        return rest

    def fini_single(self) -> None:
        self._clear_output()
        self.streaming = False
        if self.session is not None and not self.options.keep_kv_cache:
            self.session.reset()

    def output_metadata(self) -> bytes:
        text = (f'{{"input_tokens": {len(self.inputs or ())}, "output_tokens": {len(self.tokens)}, '
                f'"llama_build_number": {LLAMA_BUILD_NUMBER}, "llama_commit": "{LLAMA_COMMIT}"')
        if self.options.keep_kv_cache:
            position = self.session.position if self.session is not None else 0
            text += (f', "cached_tokens": {self.cached}, "prefill_tokens": {self.prefilled}, '
                     f'"position": {position}')
        return (text + "}").encode()

    def close(self) -> None:
        self._generator = None
        if self.session is not None:
            self.session.close()
            self.session = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _rewind(session: Session, n: int) -> None:
    """Keep the session's first ``n`` tokens (their cached keys and values stay valid)."""
    if n == 0:
        session.reset()
    elif n < session.position:
        session.truncate(n)


def _sampling(o: GraphOptions, capacity: int) -> SamplingParams:
    """llama.cpp's sampler settings in the engine's terms (out-of-range values as llama.cpp
    treats them: top-k <= 0 and penalty 0 are off, top-p 0 keeps the best token)."""
    from driftwood.model import SamplingParams

    return SamplingParams(
        temperature=o.temp,
        top_k=max(o.top_k, 0),
        top_p=min(max(o.top_p, 1e-30), 1.0),
        min_p=min(max(o.min_p, 0.0), 1.0),
        repetition_penalty=o.repeat_penalty if o.repeat_penalty > 0 else 1.0,
        repeat_last_n=capacity if o.repeat_last_n < 0 else o.repeat_last_n,
        frequency_penalty=o.frequency_penalty,
        presence_penalty=o.presence_penalty,
    )


class WasiNN(HostModule):
    """The ``wasi_ephemeral_nn`` host functions for one actor. Models come from ``pool`` (its
    names are the ``--nn-preload`` names); graphs and contexts are this actor's alone."""

    module = "wasi_ephemeral_nn"
    internal_error = RUNTIME_ERROR
    propagate = (DeadlineExceeded,)

    def __init__(self, actor: Actor, pool: ModelPool, *, max_model_bytes: int = MAX_MODEL_BYTES,
                 max_kv_bytes: int = MAX_KV_BYTES, max_handles: int = MAX_HANDLES) -> None:
        super().__init__()
        self.actor = actor
        self.pool = pool
        self.max_model_bytes = max_model_bytes
        self.max_kv_bytes = max_kv_bytes
        self.graphs: Handles[Graph] = Handles(first=0, limit=max_handles)
        self.contexts: Handles[ExecutionContext] = Handles(first=0, limit=max_handles)
        self.by_name: dict[str, int] = {}  # load_by_name's cache: name -> graph handle
        self._scratch: Path | None = None

    @staticmethod
    def factory(pool: ModelPool, **kwargs: int) -> Callable[[Actor], WasiNN]:
        """For ``Actor(host_modules=[WasiNN.factory(pool)])``."""
        return lambda actor: WasiNN(actor, pool, **kwargs)

    def fault_code(self, fault: GuestFault) -> int:
        log.debug("wasi-nn: %s", fault)
        return INVALID_ARGUMENT if fault.code < 0 else fault.code  # GuestMemory's DW_E* codes

    @property
    def guest(self) -> GuestMemory:
        if self.memory is None:
            raise GuestFault(MISSING_MEMORY, "the guest exports no memory")
        return self.memory

    def _kv_budget(self, ctx: ExecutionContext, capacity: int) -> None:
        """Refuse (7) a session whose KV cache would take the actor past ``max_kv_bytes``."""

        def kv_bytes(model: Model, tokens: int) -> int:
            c = model.config
            return 2 * c.n_layers * c.n_kv_heads * c.head_dim * tokens * model.dtype.itemsize

        held = sum(kv_bytes(c.graph.model, c.session.capacity) for _, c in self.contexts.items()
                   if c.session is not None and c is not ctx)
        want = kv_bytes(ctx.graph.model, capacity)
        if held + want > self.max_kv_bytes:
            raise GuestFault(TOO_LARGE, f"a {capacity}-token KV cache ({want >> 20} MiB) does not fit in this "
                                        f"actor's {self.max_kv_bytes >> 20} MiB ({held >> 20} MiB in use)")

    def _read_json(self, ptr: int, size: int) -> bytes:
        self.guest.check(ptr, size)
        if size > MAX_METADATA_BYTES:
            raise GuestFault(TOO_LARGE, f"{size} bytes of metadata exceed {MAX_METADATA_BYTES}")
        return self.guest.read(ptr, size)

    # -- handles -------------------------------------------------------------------------------

    def _graph(self, handle: int) -> Graph:
        graph = self.graphs.get(handle)
        if graph is None:
            raise GuestFault(INVALID_ARGUMENT, f"no graph {handle}")
        return graph

    def _context(self, handle: int, *, live_graph: bool = False) -> ExecutionContext:
        ctx = self.contexts.get(handle)
        if ctx is None:
            raise GuestFault(INVALID_ARGUMENT, f"no execution context {handle}")
        if live_graph and not ctx.graph.live:
            raise GuestFault(INVALID_ARGUMENT, f"the graph of context {handle} was unloaded")
        return ctx

    # -- loading -------------------------------------------------------------------------------

    def _add_graph(self, model: Model, update: Update | None, *, name: str | None = None,
                   scratch: Path | None = None) -> int:
        graph = Graph(model, GraphOptions(), ContextOptions(), name=name, scratch=scratch)
        if update is not None:
            graph.options = update.apply_graph(graph.options)
            graph.defaults = update.apply_context(graph.defaults)
        try:
            return self.graphs.add(graph)
        except OverflowError:
            _remove_scratch(graph)
            raise GuestFault(BUSY, f"at most {self.graphs.limit} graphs may be open") from None

    def _load_registered(self, name: str) -> Model:
        """The pool's model ``name``: 103 if its file is missing, 1 if it does not load."""
        from driftwood.model.registry import resolve

        try:
            resolve(self.pool.spec(name))
        except ModelError as exc:
            raise GuestFault(MODEL_NOT_FOUND, str(exc)) from None
        try:
            return self.pool.get(name)
        except ModelError as exc:
            raise GuestFault(INVALID_ARGUMENT, f"model {name!r} does not load: {exc}") from None

    def _preload_name(self, path: str) -> str:
        """The registered name whose model file is ``path``: a guest may not open other files."""
        from driftwood.model.registry import resolve

        real = os.path.realpath(path)
        for name in self.pool.names():
            spec = self.pool.spec(name)
            if spec == path:
                return name
            try:
                if os.path.realpath(resolve(spec)) == real:
                    return name
            except ModelError:
                continue
        raise GuestFault(MODEL_NOT_FOUND, f"preload:{path} is not a model this host registered")

    def _load_bytes(self, offset: int, size: int) -> tuple[Model, Path]:
        """GGUF bytes from guest memory, loaded through a private temporary file."""
        from driftwood.model import load_model

        if size > self.max_model_bytes:
            raise GuestFault(TOO_LARGE, f"a {size}-byte model exceeds the limit of {self.max_model_bytes}")
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="driftwood-wasi-nn-"))  # mode 0700
        fd, name = tempfile.mkstemp(suffix=".gguf", dir=self._scratch)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.guest.arena.buffer(offset, size) if size else b"")
            return load_model(str(path), device=self.pool.device, dtype=self.pool.dtype, progress=False), path
        except Exception as exc:  # the parser met guest-made bytes: any failure is the guest's
            path.unlink(missing_ok=True)
            raise GuestFault(INVALID_ARGUMENT, f"the GGUF bytes do not load: {exc}") from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    @export("load", "u32 u32 u32 u32 ptr")
    def load(self, builders: int, count: int, encoding: int, target: int, graph_out: int) -> int:
        mem = self.guest
        mem.check(graph_out, 4)
        if target >= N_TARGETS:
            raise GuestFault(INVALID_ARGUMENT, f"unknown execution target {target}")
        if count > MAX_BUILDERS:
            raise GuestFault(INVALID_ARGUMENT, f"{count} graph builders (GGML reads two)")
        table = mem.read(builders, BUILDER.size * count)
        parts = [BUILDER.unpack_from(table, BUILDER.size * i) for i in range(count)]
        for ptr, size in parts:
            mem.check(ptr, size)
        if encoding >= N_ENCODINGS:
            raise GuestFault(INVALID_ENCODING, f"unknown graph encoding {encoding}")
        if encoding != GGML:
            raise GuestFault(INVALID_ARGUMENT, f"graph encoding {encoding} is not supported (only GGML, 6)")
        if not parts:
            raise GuestFault(INVALID_ARGUMENT, "load needs builder 0 (the model)")
        update = parse_metadata(self._read_json(*parts[1])) if len(parts) > 1 else None
        ptr, size = parts[0]
        head = mem.read(ptr, min(size, len(PRELOAD)))
        scratch = None
        if head == PRELOAD:
            if size > MAX_NAME_BYTES + len(PRELOAD):
                raise GuestFault(MODEL_NOT_FOUND, "preload path too long")
            try:
                path = mem.read(ptr + len(PRELOAD), size - len(PRELOAD)).decode("utf-8")
            except UnicodeDecodeError:
                raise GuestFault(MODEL_NOT_FOUND, "preload path is not UTF-8") from None
            model = self._load_registered(self._preload_name(path))
        else:
            model, scratch = self._load_bytes(mem.check(ptr, size), size)
        mem.write_u32(graph_out, self._add_graph(model, update, scratch=scratch))
        return SUCCESS

    def _load_by_name(self, name_ptr: int, name_len: int, config: bytes | None, graph_out: int) -> int:
        mem = self.guest
        mem.check(graph_out, 4)
        mem.check(name_ptr, name_len)
        if name_len > MAX_NAME_BYTES:
            raise GuestFault(NOT_FOUND, "model name too long")
        try:
            name = mem.read(name_ptr, name_len).decode("utf-8")
        except UnicodeDecodeError:
            raise GuestFault(NOT_FOUND, "model name is not UTF-8") from None
        cached = self.by_name.get(name)
        if cached is not None:  # later loads of a name return the graph, config ignored
            mem.write_u32(graph_out, cached)
            return SUCCESS
        if name not in self.pool:
            raise GuestFault(NOT_FOUND, f"no preloaded model named {name!r}")
        update = parse_metadata(config) if config is not None else None
        handle = self._add_graph(self._load_registered(name), update, name=name)
        self.by_name[name] = handle
        mem.write_u32(graph_out, handle)
        return SUCCESS

    @export("load_by_name", "ptr u32 ptr")
    def load_by_name(self, name_ptr: int, name_len: int, graph_out: int) -> int:
        return self._load_by_name(name_ptr, name_len, None, graph_out)

    @export("load_by_name_with_config", "ptr u32 ptr u32 ptr")
    def load_by_name_with_config(self, name_ptr: int, name_len: int, cfg_ptr: int, cfg_len: int,
                                 graph_out: int) -> int:
        mem = self.guest
        mem.check(graph_out, 4)
        mem.check(name_ptr, name_len)
        return self._load_by_name(name_ptr, name_len, self._read_json(cfg_ptr, cfg_len), graph_out)

    @export("init_execution_context", "u32 ptr")
    def init_execution_context(self, graph_handle: int, ctx_out: int) -> int:
        mem = self.guest
        mem.check(ctx_out, 4)
        graph = self._graph(graph_handle)
        if not graph.live:
            raise GuestFault(INVALID_ARGUMENT, f"graph {graph_handle} was unloaded")
        try:
            handle = self.contexts.add(ExecutionContext(graph, self._kv_budget))
        except OverflowError:
            raise GuestFault(BUSY, f"at most {self.contexts.limit} execution contexts may be open") from None
        mem.write_u32(ctx_out, handle)
        return SUCCESS

    # -- inference -------------------------------------------------------------------------------

    @export("set_input", "u32 u32 ptr")
    def set_input(self, handle: int, index: int, tensor_ptr: int) -> int:
        mem = self.guest
        dims_ptr, dims_len, kind, data_ptr, data_len = TENSOR.unpack(mem.read(tensor_ptr, TENSOR.size))
        mem.check(dims_ptr, 4 * dims_len)  # dims are checked, then ignored (GGML takes bytes)
        mem.check(data_ptr, data_len)
        if kind not in TENSOR_TYPES:
            raise GuestFault(INVALID_ARGUMENT, f"tensor type {kind} is not one set_input takes")
        ctx = self._context(handle, live_graph=True)
        if index == 1:
            update = parse_metadata(self._read_json(data_ptr, data_len))
            ctx.graph.options = update.apply_graph(ctx.graph.options)
            ctx.options = update.apply_context(ctx.options)
            return SUCCESS
        if data_len > MAX_PROMPT_BYTES:
            raise GuestFault(TOO_LARGE, f"a {data_len}-byte prompt exceeds {MAX_PROMPT_BYTES} bytes")
        try:
            prompt = mem.read(data_ptr, data_len).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GuestFault(INVALID_ARGUMENT, f"the prompt is not UTF-8: {exc.reason}") from None
        ctx.inputs = ctx.graph.model.tokenizer.encode(prompt)  # BOS as the model says; specials parsed
        ctx.streaming = False
        return SUCCESS

    @export("compute", "u32")
    def compute(self, handle: int) -> int:
        ctx = self._context(handle, live_graph=True)
        ctx.streaming = False
        check = self.actor.check_deadline
        ctx.begin(check, ctx.options.n_predict)
        status: int | None = SUCCESS
        while status == SUCCESS:
            status = ctx.step(check, self.actor.write_stdout, single=False)
        rest = ctx.end()
        if ctx.options.stream_stdout and rest:  # what was streamed equals the output
            self.actor.write_stdout(rest.encode())
        return SUCCESS if status in (None, END_OF_SEQUENCE) else status

    @export("compute_single", "u32")
    def compute_single(self, handle: int) -> int:
        ctx = self._context(handle, live_graph=True)
        if not ctx.streaming:  # the first call after set_input evaluates the prompt; n-predict is ignored
            ctx.begin(self.actor.check_deadline, -1)
            ctx.streaming = True
        status = ctx.step(self.actor.check_deadline, None, single=True)
        if status != SUCCESS:
            ctx.streaming = False
            ctx.end()
        return END_OF_SEQUENCE if status is None else status

    @export("fini_single", "u32")
    def fini_single(self, handle: int) -> int:
        self._context(handle).fini_single()
        return SUCCESS

    def _write_output(self, data: bytes, out: int, out_max: int, written: int) -> int:
        mem = self.guest
        if len(data) > out_max:
            mem.write_u32(written, len(data))  # the size needed, and nothing else is written
            return TOO_LARGE
        mem.write(out, data)
        mem.write_u32(written, len(data))
        return SUCCESS

    @export("get_output", "u32 u32 ptr u32 ptr")
    def get_output(self, handle: int, index: int, out: int, out_max: int, written: int) -> int:
        mem = self.guest
        mem.check(out, out_max)
        mem.check(written, 4)
        ctx = self._context(handle)  # still readable after its graph is unloaded
        data = ctx.output_metadata() if index == 1 else ctx.text.encode()
        return self._write_output(data, out, out_max, written)

    @export("get_output_single", "u32 u32 ptr u32 ptr")
    def get_output_single(self, handle: int, index: int, out: int, out_max: int, written: int) -> int:
        ctx = self._context(handle)
        mem = self.guest
        mem.check(out, out_max)
        mem.check(written, 4)
        data = ctx.output_metadata() if index == 1 else ctx.piece.encode()
        return self._write_output(data, out, out_max, written)

    # -- releasing -------------------------------------------------------------------------------

    @export("unload", "u32")
    def unload(self, handle: int) -> int:
        graph = self._graph(handle)
        if not graph.live:
            raise GuestFault(INVALID_ARGUMENT, f"graph {handle} was already unloaded")
        graph.live = False
        self.graphs.pop(handle)
        if graph.name is not None and self.by_name.get(graph.name) == handle:
            del self.by_name[graph.name]
        if not any(ctx.graph is graph for _, ctx in self.contexts.items()):
            _remove_scratch(graph)
        return SUCCESS

    @export("finalize_execution_context", "u32")
    def finalize_execution_context(self, handle: int) -> int:
        ctx = self._context(handle)
        self.contexts.pop(handle)
        ctx.close()
        graph = ctx.graph
        if not graph.live and not any(c.graph is graph for _, c in self.contexts.items()):
            _remove_scratch(graph)
        return SUCCESS

    def close(self) -> None:
        """Free every session and remove temporary model files (Actor.close calls this)."""
        for handle, ctx in self.contexts.items():
            ctx.close()
            self.contexts.pop(handle)
        for handle, _ in self.graphs.items():
            self.graphs.pop(handle)
        self.by_name.clear()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _remove_scratch(graph: Graph) -> None:
    if graph.scratch is not None:
        graph.scratch.unlink(missing_ok=True)
        graph.scratch = None
