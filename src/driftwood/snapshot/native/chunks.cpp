// Restoring KV chunk files (docs/snapshot-format.md) into a CPU cache, on a few threads and
// without the GIL.
//
// A chunk's payload is: k planes | v planes, each side n_layers * n_kv_heads contiguous planes
// of (count, head_dim) elements in (layer, kv_head) order. Plane (l, h) of a chunk starting at
// token t0 lands at cache[side] + l * layer_stride + h * head_stride + t0 * row_bytes, itself a
// contiguous run of count * row_bytes bytes (the (n_layers, batch, n_kv_heads, capacity,
// head_dim) cache of model/cache.py, the batch row already applied to the base addresses).
//
// read_chunks: whole chunk files -> header, planes and token ids, hashing each file with
// xxh3-128 as it goes (xxHash 0.8.4, vendored as xxhash.h: the same digest python-xxhash gives
// the writer). Each file is mapped and read once: a plane is hashed straight from the page cache
// and, while it is still in the core's cache, copied into the KV cache with streaming stores
// (no read of the destination lines first). That moves the bytes once, where reading the file
// with preadv (the fallback where a file cannot be mapped) copies them into the cache in the
// kernel and the hash reads them back. A file truncated while mapped raises SIGBUS on access;
// the handler below turns that into an error for the chunk. copy_chunks: payloads already in memory (checked when they were loaded) ->
// planes. read_files: whole files into host buffers as they are (the staging of a restore into
// a GPU cache or another dtype), hashed the same way; read_files_to_gpu also queues each file's
// payload for the GPU from the thread that reads it, a step at a time, so that the
// host-to-device copies overlap the reads. Work is spread over torch's intra-op threads.
//
// Nothing here trusts the data: the caller (driftwood/snapshot/native/__init__.py) validates
// every address range before the call, and compares each header, digest and token id with the
// manifest before the session adopts the bytes.

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define XXH_INLINE_ALL
#include "xxhash.h"

namespace py = pybind11;

namespace {

constexpr size_t kGroupBytes = 256 << 10;
constexpr size_t kMaxIov = 512;

struct Cache {
  uint8_t* side[2];  // k and v at (layer 0, the batch row, kv head 0, position 0)
  int64_t layers, heads, layer_stride, head_stride, row_bytes;

  uint8_t* plane(int s, int64_t l, int64_t h, int64_t t0) const {
    return side[s] + l * layer_stride + h * head_stride + t0 * row_bytes;
  }
};

// Read all of iov from offset, through short reads. 0, -1 when the file ends first, or errno.
int read_all(int fd, std::vector<iovec>& iov, int64_t offset) {
  size_t i = 0;
  while (true) {
    while (i < iov.size() && iov[i].iov_len == 0) ++i;  // preadv would return 0 for these
    if (i == iov.size()) return 0;
    ssize_t got = preadv(fd, &iov[i], static_cast<int>(std::min(iov.size() - i, kMaxIov)), offset);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return errno;
    if (got == 0) return -1;
    offset += got;
    for (; i < iov.size() && static_cast<size_t>(got) >= iov[i].iov_len; ++i) got -= iov[i].iov_len;
    if (got > 0) {
      iov[i].iov_base = static_cast<uint8_t*>(iov[i].iov_base) + got;
      iov[i].iov_len -= got;
    }
  }
}

// Run body(0 .. n-1) on torch's intra-op threads, without the GIL. (Threads of our own would
// compete with torch's OpenMP workers, which spin for milliseconds after each parallel op.)
void parallel(size_t n, const std::function<void(size_t)>& body) {
  py::gil_scoped_release no_gil;
  at::parallel_for(0, static_cast<int64_t>(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(static_cast<size_t>(i));
  });
}

// xxh3-128 over a stream of pieces; digest() writes the canonical (big-endian) bytes, as
// python-xxhash's digest() gives them.
struct Xxh3 {
  XXH3_state_t state;
  Xxh3() {
    XXH3_INITSTATE(&state);
    XXH3_128bits_reset(&state);
  }
  void update(const void* p, size_t n) { XXH3_128bits_update(&state, p, n); }
  void digest(uint8_t out[16]) {
    XXH128_canonical_t canon;
    XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(&state));
    std::memcpy(out, canon.digest, 16);
  }
};

// One vector from src to an aligned dst, with a streaming (non-temporal) or an ordinary store.
#if defined(__AVX512F__)
constexpr size_t kVec = 64;
template <bool Stream>
void copy_vector(uint8_t* dst, const uint8_t* src) {
  const __m512i x = _mm512_loadu_si512(src);
  if constexpr (Stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), x);
  else _mm512_store_si512(reinterpret_cast<__m512i*>(dst), x);
}
#elif defined(__AVX2__)
constexpr size_t kVec = 32;
template <bool Stream>
void copy_vector(uint8_t* dst, const uint8_t* src) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  if constexpr (Stream) _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), x);
  else _mm256_store_si256(reinterpret_cast<__m256i*>(dst), x);
}
#else
constexpr size_t kVec = 1;
template <bool Stream>
void copy_vector(uint8_t* dst, const uint8_t* src) { *dst = *src; }
#endif

// n bytes, dst's aligned body a vector at a time. Stream: a restore writes each cache line of
// the KV cache whole and does not read it soon, so the lines are not fetched first. Ordinary
// stores fill the L1 buffer a page is checked in (glibc's memcpy took 2.4 ms more over 94 MB
// here than this loop: medians of 25 restores in one process).
template <bool Stream>
void copy_bytes(uint8_t* dst, const uint8_t* src, size_t n) {
  if constexpr (kVec == 1) {
    std::memcpy(dst, src, n);
  } else {
    const size_t head = std::min(n, (kVec - (reinterpret_cast<uintptr_t>(dst) & (kVec - 1))) & (kVec - 1));
    std::memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    const size_t body = n & ~(kVec - 1);
    for (size_t i = 0; i < body; i += kVec) copy_vector<Stream>(dst + i, src + i);
    std::memcpy(dst + body, src + body, n - body);
  }
}

void stream_copy(uint8_t* dst, const uint8_t* src, size_t n) { copy_bytes<true>(dst, src, n); }

void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();  // streaming stores are weakly ordered: visible before the caller is told "done"
#endif
}

// The SIGBUS guard. Reading a mapped page that the file no longer holds (another process cut the
// file short after it was checked) or that the filesystem cannot supply (an I/O error) raises
// SIGBUS at the access. While a thread reads a mapping, its guard holds the mapping's range and
// where to jump: a fault inside that range on that thread returns to map_chunk, which reports
// the chunk as unreadable; any other SIGBUS goes on to the handler that was there before
// (Python's faulthandler, or the default action: the process dies as it would have). Our
// handler is installed only while mapped reads run (install on the first concurrent call,
// restore on the last), so a handler installed later by others never sits in front of it.
// initial-exec: the handler reads the guard without __tls_get_addr (which may allocate).
struct Guard {
  sigjmp_buf* volatile jump;
  volatile uintptr_t begin, end;
};
__attribute__((tls_model("initial-exec"))) thread_local Guard t_guard{nullptr, 0, 0};

struct sigaction g_previous_sigbus;
std::mutex g_sigbus_mutex;
int g_sigbus_users = 0;

// Arm and disarm: the fences keep the compiler from moving the mapped reads outside.
void guard(sigjmp_buf* jump, const void* begin, size_t size) {
  t_guard.begin = reinterpret_cast<uintptr_t>(begin);
  t_guard.end = t_guard.begin + size;
  t_guard.jump = jump;
  std::atomic_signal_fence(std::memory_order_seq_cst);
}

void unguard() {
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_guard.jump = nullptr;
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  sigjmp_buf* const jump = t_guard.jump;
  if (jump != nullptr && info != nullptr && info->si_code > 0) {  // > 0: a fault, not kill()
    const auto at = reinterpret_cast<uintptr_t>(info->si_addr);
    if (at >= t_guard.begin && at < t_guard.end) siglongjmp(*jump, 1);
  }
  const struct sigaction prev = g_previous_sigbus;
  if (prev.sa_flags & SA_SIGINFO) {
    prev.sa_sigaction(sig, info, context);
  } else if (prev.sa_handler == SIG_IGN && (info == nullptr || info->si_code <= 0)) {
    // a SIGBUS sent by kill() to a process that ignores it: ignored
  } else if (prev.sa_handler == SIG_DFL || prev.sa_handler == SIG_IGN) {
    // the default action (the kernel's for a fault even when ignored): delivered on return
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, nullptr);
    raise(sig);
  } else {
    prev.sa_handler(sig);
  }
}

// Our handler in front for the scope's life (see Guard).
class SigbusScope {
 public:
  SigbusScope() {
    std::lock_guard<std::mutex> lock(g_sigbus_mutex);
    if (g_sigbus_users++ == 0) {
      struct sigaction sa {};
      sa.sa_sigaction = on_sigbus;
      sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
      sigemptyset(&sa.sa_mask);
      sigaction(SIGBUS, &sa, &g_previous_sigbus);
    }
  }
  ~SigbusScope() {
    std::lock_guard<std::mutex> lock(g_sigbus_mutex);
    if (--g_sigbus_users == 0) {
      struct sigaction current {};
      sigaction(SIGBUS, nullptr, &current);
      if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus)  // not replaced meanwhile
        sigaction(SIGBUS, &g_previous_sigbus, nullptr);
    }
  }
  SigbusScope(const SigbusScope&) = delete;
  SigbusScope& operator=(const SigbusScope&) = delete;
};

// A mapped file is read a page at a time, the next page requested first: the hardware
// prefetchers stop at page boundaries, and page-cache pages are scattered (measured on the
// 2-core VM: 9.06 against 9.73 ms for 94 MB, medians of 25).
constexpr size_t kPiece = 4096;

void prefetch(const uint8_t* from, const uint8_t* end) {
  const uint8_t* const stop = std::min(from + kPiece, end);
  for (const uint8_t* p = from; p < stop; p += 64) __builtin_prefetch(p, 0, 3);
}

constexpr int kNoMap = -2;   // the file could not be mapped: read it with preadv instead
constexpr int kFault = -3;   // SIGBUS reading the mapping: cut short meanwhile, or an I/O error

std::atomic<int64_t> g_truncate_after_map{-1};  // tests: cut each file to this size once mapped

// Each piece is copied from the page cache once, into a buffer that stays in L1, and both the
// hash and the streaming copy into the cache read that buffer: what is checked is what is
// placed, even if the file changes in place meanwhile.
int map_chunk(const Cache& cache, int fd, uint8_t* header, int64_t header_bytes, int64_t t0,
              int64_t count, uint8_t* ids, uint8_t digest[16]) {
  struct stat st;
  if (fstat(fd, &st) != 0) return errno;
  const size_t plane = count * cache.row_bytes;
  const size_t need = header_bytes + 2 * cache.layers * cache.heads * plane + 4 * count;
  if (static_cast<size_t>(st.st_size) < need) return -1;
  void* const mapped = mmap(nullptr, need, PROT_READ, MAP_PRIVATE, fd, 0);
  if (mapped == MAP_FAILED) return kNoMap;
  if (const int64_t cut = g_truncate_after_map.load(); cut >= 0) {
    const std::string path = "/proc/self/fd/" + std::to_string(fd);  // the descriptor may be read-only
    if (truncate(path.c_str(), cut) != 0) {
      const int err = errno;
      munmap(mapped, need);
      return err;
    }
  }
  sigjmp_buf jump;
  if (sigsetjmp(jump, 1) != 0) {  // 1: restore the signal mask (SIGBUS is blocked in the handler)
    unguard();
    store_fence();
    munmap(mapped, need);
    return kFault;
  }
  guard(&jump, mapped, need);
  Xxh3 hash;
  const uint8_t* src = static_cast<const uint8_t*>(mapped);
  std::memcpy(header, src, header_bytes);
  hash.update(header, header_bytes);
  src += header_bytes;
  const uint8_t* const end = static_cast<const uint8_t*>(mapped) + need;
  alignas(64) uint8_t piece[kPiece];
  for (int s = 0; s < 2; ++s) {
    for (int64_t l = 0; l < cache.layers; ++l) {
      for (int64_t h = 0; h < cache.heads; ++h, src += plane) {
        uint8_t* const dst = cache.plane(s, l, h, t0);
        for (size_t at = 0; at < plane; at += kPiece) {
          const size_t n = std::min(kPiece, plane - at);
          if (static_cast<size_t>(end - src) > at + kPiece) prefetch(src + at + kPiece, end);
          copy_bytes<false>(piece, src + at, n);
          hash.update(piece, n);
          stream_copy(dst + at, piece, n);
        }
      }
    }
  }
  std::memcpy(ids, src, 4 * count);
  hash.update(ids, 4 * count);
  unguard();
  store_fence();
  hash.digest(digest);
  munmap(mapped, need);
  return 0;
}

int read_chunk(const Cache& cache, int fd, uint8_t* header, int64_t header_bytes, int64_t t0,
               int64_t count, uint8_t* ids, uint8_t digest[16]) {
  Xxh3 hash;
  std::vector<iovec> iov{{header, static_cast<size_t>(header_bytes)}};
  if (int err = read_all(fd, iov, 0)) return err;
  hash.update(header, header_bytes);
  int64_t offset = header_bytes;
  const size_t plane = count * cache.row_bytes;
  std::vector<uint8_t*> group;
  auto flush = [&]() -> int {
    iov.clear();
    for (uint8_t* p : group) iov.push_back({p, plane});
    if (int err = read_all(fd, iov, offset)) return err;
    for (uint8_t* p : group) hash.update(p, plane);
    offset += group.size() * plane;
    group.clear();
    return 0;
  };
  for (int s = 0; s < 2; ++s) {
    for (int64_t l = 0; l < cache.layers; ++l) {
      for (int64_t h = 0; h < cache.heads; ++h) {
        group.push_back(cache.plane(s, l, h, t0));
        if (group.size() * plane >= kGroupBytes) {
          if (int err = flush()) return err;
        }
      }
    }
  }
  if (!group.empty()) {
    if (int err = flush()) return err;
  }
  iov.assign({{ids, static_cast<size_t>(4 * count)}});
  if (int err = read_all(fd, iov, offset)) return err;
  hash.update(ids, 4 * count);
  hash.digest(digest);
  return 0;
}

// Copies to the GPU queued by the reading threads themselves, through CUDA driver entry points
// that the caller hands in (this file builds without CUDA): cuCtxSetCurrent and
// cuMemcpyHtoDAsync_v2, onto one stream of one context. The source must be pinned memory for
// the copies to be asynchronous.
struct Gpu {
  int (*set_context)(void* ctx);
  int (*copy)(uint64_t dst, const void* src, size_t n, void* stream);
  void* context;
  void* stream;
  int64_t step;  // bytes a copy, at least, until the file's last piece
};

// A file's payload bytes [begin, end) go to device address dst as they are read.
struct Payload {
  uint64_t dst;
  int64_t begin, end;
};

constexpr int kCudaError = -1000;  // a status of kCudaError - r: the driver's error r

// The whole file (size bytes) into dest, hashed with xxh3-128 kGroupBytes at a time. With gpu
// and payload, each run of payload bytes is queued for the device once step of them are in
// dest (the rest after the last piece), before they are hashed.
int read_file(int fd, uint8_t* dest, int64_t size, const Gpu* gpu, const Payload* payload, uint8_t digest[16]) {
  Xxh3 hash;
  std::vector<iovec> iov;
  int64_t queued = payload ? payload->begin : 0;
  if (gpu != nullptr && payload != nullptr) {
    if (int r = gpu->set_context(gpu->context)) return kCudaError - r;
  }
  for (int64_t offset = 0; offset < size; offset += kGroupBytes) {
    const size_t n = static_cast<size_t>(std::min<int64_t>(kGroupBytes, size - offset));
    iov.assign({{dest + offset, n}});
    if (int err = read_all(fd, iov, offset)) return err;
    if (gpu != nullptr && payload != nullptr) {
      const int64_t ready = std::min<int64_t>(offset + static_cast<int64_t>(n), payload->end);
      if (ready - queued >= gpu->step || (offset + static_cast<int64_t>(n) == size && ready > queued)) {
        const uint64_t at = payload->dst + static_cast<uint64_t>(queued - payload->begin);
        if (int r = gpu->copy(at, dest + queued, static_cast<size_t>(ready - queued), gpu->stream))
          return kCudaError - r;
        queued = ready;
      }
    }
    hash.update(dest + offset, n);
  }
  hash.digest(digest);
  return 0;
}

// read(c, digest of file c) for every file on torch's threads -> the Python result
// ([xxh3-128 digest of each file, canonical bytes], [0, -1 (file ended early), kFault (SIGBUS
// reading the mapping), errno, or kCudaError minus a CUDA driver error]).
py::tuple read_each(size_t n, const std::function<int(size_t, uint8_t*)>& read) {
  std::vector<uint8_t> digests(16 * n);
  std::vector<int> status(n);
  parallel(n, [&](size_t c) { status[c] = read(c, &digests[16 * c]); });
  py::list out;
  for (size_t c = 0; c < n; ++c) out.append(py::bytes(reinterpret_cast<char*>(&digests[16 * c]), 16));
  return py::make_tuple(out, status);
}

Cache make_cache(uintptr_t k, uintptr_t v, int64_t layers, int64_t heads, int64_t layer_stride,
                 int64_t head_stride, int64_t row_bytes) {
  return {{reinterpret_cast<uint8_t*>(k), reinterpret_cast<uint8_t*>(v)}, layers, heads, layer_stride,
          head_stride, row_bytes};
}

}  // namespace

// Returns read_each's ([digest of each file], [status of each file]).
// map: through map_chunk, falling back to read_chunk for a file that cannot be mapped; else
// read_chunk for every file.
py::tuple read_chunks(std::vector<int> fds, std::vector<uintptr_t> headers, std::vector<int64_t> header_bytes,
                      std::vector<int64_t> starts, std::vector<int64_t> counts, std::vector<uintptr_t> ids,
                      uintptr_t k, uintptr_t v, int64_t layers, int64_t heads, int64_t layer_stride,
                      int64_t head_stride, int64_t row_bytes, bool map) {
  const size_t n = fds.size();
  if (headers.size() != n || header_bytes.size() != n || starts.size() != n || counts.size() != n || ids.size() != n)
    throw std::invalid_argument("read_chunks: one header, start, count and id buffer per file");
  const Cache cache = make_cache(k, v, layers, heads, layer_stride, head_stride, row_bytes);
  std::optional<SigbusScope> sigbus;
  if (map) sigbus.emplace();
  return read_each(n, [&](size_t c, uint8_t* digest) {
    auto* header = reinterpret_cast<uint8_t*>(headers[c]);
    auto* id_buffer = reinterpret_cast<uint8_t*>(ids[c]);
    if (map) {
      const int status = map_chunk(cache, fds[c], header, header_bytes[c], starts[c], counts[c], id_buffer, digest);
      if (status != kNoMap) return status;
    }
    return read_chunk(cache, fds[c], header, header_bytes[c], starts[c], counts[c], id_buffer, digest);
  });
}

// Tests: every file that map_chunk maps is cut to size bytes right after (size < 0: off), as
// if another process truncated it mid-read.
void truncate_after_map_for_tests(int64_t size) { g_truncate_after_map.store(size); }

// Returns read_each's ([digest of each file's first size bytes], [status of each file]).
py::tuple read_files(std::vector<int> fds, std::vector<uintptr_t> dests, std::vector<int64_t> sizes) {
  const size_t n = fds.size();
  if (dests.size() != n || sizes.size() != n)
    throw std::invalid_argument("read_files: one destination and size per file");
  return read_each(n, [&](size_t c, uint8_t* digest) {
    return read_file(fds[c], reinterpret_cast<uint8_t*>(dests[c]), sizes[c], nullptr, nullptr, digest);
  });
}

// read_files, each file's payload [begins[c], ends[c]) also queued for device address dsts[c]
// as it arrives (Gpu above: the entry points, context and stream as integers). A status below
// -1 is kCudaError minus the driver's error.
py::tuple read_files_to_gpu(std::vector<int> fds, std::vector<uintptr_t> dests, std::vector<int64_t> sizes,
                            std::vector<uint64_t> dsts, std::vector<int64_t> begins, std::vector<int64_t> ends,
                            uintptr_t set_context, uintptr_t copy, uintptr_t context, uintptr_t stream,
                            int64_t step) {
  const size_t n = fds.size();
  if (dests.size() != n || sizes.size() != n || dsts.size() != n || begins.size() != n || ends.size() != n)
    throw std::invalid_argument("read_files_to_gpu: one destination, size and payload per file");
  if (set_context == 0 || copy == 0 || step < 1)
    throw std::invalid_argument("read_files_to_gpu: no driver entry points, or a step below 1");
  const Gpu gpu{reinterpret_cast<int (*)(void*)>(set_context),
                reinterpret_cast<int (*)(uint64_t, const void*, size_t, void*)>(copy),
                reinterpret_cast<void*>(context), reinterpret_cast<void*>(stream), step};
  std::vector<Payload> payloads(n);
  for (size_t c = 0; c < n; ++c) {
    if (begins[c] < 0 || begins[c] > ends[c] || ends[c] > sizes[c])
      throw std::invalid_argument("read_files_to_gpu: a payload outside its file");
    payloads[c] = {dsts[c], begins[c], ends[c]};
  }
  return read_each(n, [&](size_t c, uint8_t* digest) {
    return read_file(fds[c], reinterpret_cast<uint8_t*>(dests[c]), sizes[c], &gpu, &payloads[c], digest);
  });
}

void copy_chunks(std::vector<uintptr_t> payloads, std::vector<int64_t> starts, std::vector<int64_t> counts,
                 uintptr_t k, uintptr_t v, int64_t layers, int64_t heads, int64_t layer_stride,
                 int64_t head_stride, int64_t row_bytes) {
  const size_t n = payloads.size();
  if (starts.size() != n || counts.size() != n)
    throw std::invalid_argument("copy_chunks: one start and count per payload");
  const Cache cache = make_cache(k, v, layers, heads, layer_stride, head_stride, row_bytes);
  // work items of one side of one chunk, so that a single chunk still uses two threads
  parallel(2 * n, [&](size_t item) {
    const size_t c = item / 2;
    const int s = static_cast<int>(item % 2);
    const size_t plane = counts[c] * cache.row_bytes;
    const uint8_t* src = reinterpret_cast<const uint8_t*>(payloads[c]) + s * layers * heads * plane;
    for (int64_t l = 0; l < layers; ++l)
      for (int64_t h = 0; h < heads; ++h, src += plane) stream_copy(cache.plane(s, l, h, starts[c]), src, plane);
    store_fence();
  });
}

// Every one of torch's intra-op threads runs once and returns: a restore calls this before its
// Python set-up (opening files, building the expected headers), so that the threads are awake,
// spinning, when the reads are handed out, instead of sleeping in the kernel after an idle spell.
void wake() {
  parallel(static_cast<size_t>(at::get_num_threads()), [](size_t) {});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wake", &wake, "Run every intra-op thread once (chunks.cpp)");
  m.def("read_chunks", &read_chunks, "Read and hash KV chunk files into a CPU cache (chunks.cpp)");
  m.def("truncate_after_map_for_tests", &truncate_after_map_for_tests,
        "Cut every mapped chunk file to size bytes once mapped, size < 0: off (chunks.cpp, for tests)");
  m.def("read_files", &read_files, "Read and hash whole files into host buffers (chunks.cpp)");
  m.def("read_files_to_gpu", &read_files_to_gpu,
        "read_files, queuing each file's payload for the GPU as it arrives (chunks.cpp)");
  m.def("copy_chunks", &copy_chunks, "Copy in-memory KV chunk payloads into a CPU cache (chunks.cpp)");
}
