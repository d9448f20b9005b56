// The Python module of the C++ kernels, built once per SIMD level as tessel._C_<level>
// (setup.py): converts numpy buffers and calls kernels, and hands the attention
// kernels to tessel._C_ops (torch's ops) as a KernelTable (kernel_table.h).
// User input was validated in Python (pymod/_dispatch.py). What is checked
// here are internal invariants: every array a kernel reads or writes has the
// dtype, rank, shape and layout that kernel assumes, so a wrong caller gets a
// RuntimeError, never corrupted memory (extension-cpp's TORCH_INTERNAL_ASSERT).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "common.h"
#include "compress.h"
#include "kernel_table.h"
#include "linear_attention.h"
#include "looped.h"

namespace py = pybind11;
using tessel::AttentionProblem;

namespace {

[[noreturn]] void internal_error(const char* binding, const std::string& what) {
  throw std::runtime_error(std::string("tessel._C_" TESSEL_LEVEL ".") + binding + ": internal check failed: " + what);
}

std::string shape_of(const py::array& x) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < x.ndim(); ++i) s += (i ? ", " : "") + std::to_string(x.shape(i));
  return s + ")";
}

// `x` has dtype T, rank `ndim` (and `shape` where given: -1 matches any
// size), is C-contiguous, and is writable when the kernel writes it.
template <typename T>
void expect(const char* binding, const char* name, const py::array& x, std::vector<int64_t> shape,
            bool writable = false) {
  auto fail = [&](const std::string& what) { internal_error(binding, std::string(name) + " " + what); };
  if (!x.dtype().is(py::dtype::of<T>()))
    fail("has dtype " + std::string(py::str(x.dtype())) + ", expected " + std::string(py::str(py::dtype::of<T>())));
  if (x.ndim() != static_cast<py::ssize_t>(shape.size()))
    fail("has shape " + shape_of(x) + ", expected rank " + std::to_string(shape.size()));
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] >= 0 && x.shape(i) != shape[i]) fail("has shape " + shape_of(x) + ", which does not fit");
  if (!(x.flags() & py::array::c_style)) fail("must be contiguous");
  if (writable && !x.writeable()) fail("must be writable");
}

template <typename T>
T* data(py::array& x) {
  return static_cast<T*>(x.mutable_data());
}

template <typename T>
const T* cdata(const py::array& x) {
  return static_cast<const T*>(x.data());
}

// Calls fn(T{}) with T = double for a float64 array, else float (whose checks then reject any other dtype).
template <typename Fn>
auto by_dtype(const py::array& x, Fn&& fn) {
  if (x.dtype().is(py::dtype::of<double>())) return fn(double{});
  return fn(float{});
}

// z (B, dim, cols); weights (1 or loops, heads, dim, dim); checkpoints (ceil(loops / every), B, dim, cols).
template <typename T>
tessel::LoopedProblem looped_problem(const char* fn, const py::array& z, const py::array& wp, const py::array& wq,
                                     const py::array& saved, int64_t loops, int64_t key_cols, double inv_n,
                                     int64_t every, int num_threads) {
  expect<T>(fn, "z", z, {-1, -1, -1});
  expect<T>(fn, "p", wp, {-1, -1, z.shape(1), z.shape(1)});
  expect<T>(fn, "q", wq, {wp.shape(0), wp.shape(1), z.shape(1), z.shape(1)});
  if (loops < 1 || every < 1 || key_cols < 0 || key_cols > z.shape(2) || (wp.shape(0) != 1 && wp.shape(0) != loops))
    internal_error(fn, "loops, checkpoint spacing, key columns or weight count out of range");
  expect<T>(fn, "saved", saved, {(loops + every - 1) / every, z.shape(0), z.shape(1), z.shape(2)});
  return tessel::LoopedProblem{z.shape(0), z.shape(1), z.shape(2), key_cols, loops,
                               wp.shape(1), wp.shape(0), inv_n,    every,   num_threads};
}

template <typename T>
int64_t looped_forward_typed(const py::array& z, const py::array& wp, const py::array& wq, py::array& out,
                             py::array& saved, int64_t loops, int64_t key_cols, double inv_n, int64_t every,
                             int num_threads) {
  constexpr const char* fn = "looped_forward";
  const auto p = looped_problem<T>(fn, z, wp, wq, saved, loops, key_cols, inv_n, every, num_threads);
  expect<T>(fn, "out", out, {z.shape(0), z.shape(1), z.shape(2)}, true);
  expect<T>(fn, "saved", saved, {-1, -1, -1, -1}, true);
  py::gil_scoped_release release;
  return tessel::looped_forward_cpu<T>(p, cdata<T>(z), cdata<T>(wp), cdata<T>(wq), data<T>(out), data<T>(saved));
}

int64_t looped_forward(const py::array& z, const py::array& wp, const py::array& wq, py::array out, py::array saved,
                       int64_t loops, int64_t key_cols, double inv_n, int64_t every, int num_threads) {
  return by_dtype(z, [&](auto t) {
    return looped_forward_typed<decltype(t)>(z, wp, wq, out, saved, loops, key_cols, inv_n, every, num_threads);
  });
}

template <typename T>
void looped_backward_typed(const py::array& saved, const py::array& wp, const py::array& wq, const py::array& dout,
                           py::array& dz, py::array& dp, py::array& dq, int64_t loops, int64_t key_cols,
                           double inv_n, int64_t every, int num_threads) {
  constexpr const char* fn = "looped_backward";
  const auto p = looped_problem<T>(fn, dout, wp, wq, saved, loops, key_cols, inv_n, every, num_threads);
  expect<T>(fn, "dz", dz, {dout.shape(0), dout.shape(1), dout.shape(2)}, true);
  expect<T>(fn, "dp", dp, {wp.shape(0), wp.shape(1), wp.shape(2), wp.shape(3)}, true);
  expect<T>(fn, "dq", dq, {wp.shape(0), wp.shape(1), wp.shape(2), wp.shape(3)}, true);
  py::gil_scoped_release release;
  tessel::looped_backward_cpu<T>(p, cdata<T>(saved), cdata<T>(wp), cdata<T>(wq), cdata<T>(dout), data<T>(dz),
                                 data<T>(dp), data<T>(dq));
}

void looped_backward(const py::array& saved, const py::array& wp, const py::array& wq, const py::array& dout,
                     py::array dz, py::array dp, py::array dq, int64_t loops, int64_t key_cols, double inv_n,
                     int64_t every, int num_threads) {
  by_dtype(dout, [&](auto t) {
    looped_backward_typed<decltype(t)>(saved, wp, wq, dout, dz, dp, dq, loops, key_cols, inv_n, every, num_threads);
  });
}

// A bucket's matrices: grads[i] (n_i, m_i) and errors[i] (None, or the same
// shape), all of the factors' dtype, contiguous and writable. The factors of
// matrix i sit one after another in the flat buffers: pt (rank, n_i) at
// rank * sum_{j<i} n_j, qt (rank, m_i) at rank * sum_{j<i} m_j.
struct Factors {
  int64_t p_size = 0, q_size = 0;
};

py::array as_array(const char* fn, const char* what, const py::handle& x) {
  if (!py::isinstance<py::array>(x)) internal_error(fn, std::string(what) + " must be a numpy array");
  return py::reinterpret_borrow<py::array>(x);
}

template <typename T>
std::vector<tessel::CompressItem<T>> compress_items(const char* fn, const py::list& grads, const py::list& errors,
                                                    int64_t rank, Factors& sizes) {
  if (rank < 1) internal_error(fn, "rank must be >= 1");
  if (grads.size() != errors.size()) internal_error(fn, "one error entry per gradient expected");
  std::vector<tessel::CompressItem<T>> items;
  for (size_t i = 0; i < grads.size(); ++i) {
    py::array g = as_array(fn, "grads[i]", grads[i]);
    expect<T>(fn, "grads[i]", g, {-1, -1}, true);
    T* error = nullptr;
    if (!errors[i].is_none()) {
      py::array e = as_array(fn, "errors[i]", errors[i]);
      expect<T>(fn, "errors[i]", e, {g.shape(0), g.shape(1)}, true);
      error = data<T>(e);
    }
    items.push_back({data<T>(g), error, g.shape(0), g.shape(1), rank * sizes.p_size, rank * sizes.q_size});
    sizes.p_size += g.shape(0);
    sizes.q_size += g.shape(1);
  }
  sizes.p_size *= rank;
  sizes.q_size *= rank;
  return items;
}

template <typename T>
void project_typed(const py::list& grads, const py::list& errors, py::array& p, py::array& q, int64_t rank,
                   bool onto_p, int num_threads) {
  constexpr const char* fn = "compress_project";
  Factors sizes;
  const auto items = compress_items<T>(fn, grads, errors, rank, sizes);
  expect<T>(fn, "p", p, {sizes.p_size}, onto_p);
  expect<T>(fn, "q", q, {sizes.q_size}, !onto_p);
  py::gil_scoped_release release;
  if (onto_p)
    tessel::compress_project_p<T>(items.data(), items.size(), rank, data<T>(p), cdata<T>(q), num_threads);
  else
    tessel::compress_project_q<T>(items.data(), items.size(), rank, cdata<T>(p), data<T>(q), num_threads);
}

void compress_project(const py::list& grads, const py::list& errors, py::array p, py::array q, int64_t rank,
                      bool onto_p, int num_threads) {
  by_dtype(p, [&](auto t) { project_typed<decltype(t)>(grads, errors, p, q, rank, onto_p, num_threads); });
}

// keep: a one-element bool array; false (a non-finite average) leaves every
// gradient and error buffer as it was.
template <typename T>
void reconstruct_typed(const py::list& grads, const py::list& errors, const py::array& p_out,
                       const py::array& q_out, const py::array& p_err, const py::array& q_err,
                       const py::array& keep, int64_t rank, int num_threads) {
  constexpr const char* fn = "compress_reconstruct";
  Factors sizes;
  const auto items = compress_items<T>(fn, grads, errors, rank, sizes);
  expect<T>(fn, "p_out", p_out, {sizes.p_size});
  expect<T>(fn, "q_out", q_out, {sizes.q_size});
  expect<T>(fn, "p_err", p_err, {sizes.p_size});
  expect<T>(fn, "q_err", q_err, {sizes.q_size});
  expect<bool>(fn, "keep", keep, {1});
  if (!*cdata<bool>(keep)) return;
  py::gil_scoped_release release;
  tessel::compress_reconstruct<T>(items.data(), items.size(), rank, cdata<T>(p_out), cdata<T>(q_out),
                                  cdata<T>(p_err), cdata<T>(q_err), num_threads);
}

void compress_reconstruct(const py::list& grads, const py::list& errors, const py::array& p_out,
                          const py::array& q_out, const py::array& p_err, const py::array& q_err,
                          const py::array& keep, int64_t rank, int num_threads) {
  by_dtype(p_out, [&](auto t) {
    reconstruct_typed<decltype(t)>(grads, errors, p_out, q_out, p_err, q_err, keep, rank, num_threads);
  });
}

template <typename T>
void orthonormalize_typed(py::array& buf, const py::array& offsets, const py::array& lengths, int64_t rank,
                          int64_t vector_stride, int64_t element_stride, double eps, int num_threads) {
  constexpr const char* fn = "orthonormalize";
  expect<T>(fn, "buf", buf, {-1}, true);
  expect<int64_t>(fn, "offsets", offsets, {-1});
  expect<int64_t>(fn, "lengths", lengths, {offsets.shape(0)});
  if (rank < 1 || vector_stride < 0 || element_stride < 1) internal_error(fn, "rank or strides out of range");
  const int64_t* off = cdata<int64_t>(offsets);
  const int64_t* len = cdata<int64_t>(lengths);
  for (py::ssize_t i = 0; i < offsets.shape(0); ++i) {
    const int64_t vs = vector_stride > 0 ? vector_stride : len[i];
    if (off[i] < 0 || len[i] < 1 || off[i] + (rank - 1) * vs + (len[i] - 1) * element_stride >= buf.shape(0))
      internal_error(fn, "vectors " + std::to_string(i) + " reach outside buf");
  }
  py::gil_scoped_release release;
  tessel::orthonormalize<T>(data<T>(buf), off, len, offsets.shape(0), rank, vector_stride, element_stride, eps,
                            num_threads);
}

void orthonormalize(py::array buf, const py::array& offsets, const py::array& lengths, int64_t rank,
                    int64_t vector_stride, int64_t element_stride, double eps, int num_threads) {
  by_dtype(buf, [&](auto t) {
    orthonormalize_typed<decltype(t)>(buf, offsets, lengths, rank, vector_stride, element_stride, eps, num_threads);
  });
}

// The kernel table tessel._C_ops calls through (kernel_table.h): the same
// kernels as the bindings above, reached from at::Tensor without numpy.
tessel::Strides4 strides_of(const int64_t* s) { return {s[0], s[1], s[2]}; }

// The table's plain element pointers as the kernels' element type (same layout).
template <typename K, typename In>
const K* as(const In* x) {
  static_assert(sizeof(K) == sizeof(In));
  return reinterpret_cast<const K*>(x);
}

AttentionProblem problem_of(const tessel::AttentionCall& c) {
  std::vector<tessel::Segment> segments(c.num_segments);
  for (int64_t s = 0; s < c.num_segments; ++s) {
    const int64_t* r = c.segments + 6 * s;
    segments[s] = {r[0], r[1], r[2], r[3], r[4], r[5]};
  }
  const double flops = 4.0 * c.batch * c.heads * c.len_q * c.len_k * c.head_dim;
  AttentionProblem p{c.batch,          c.heads,          c.kv_heads,      c.len_q,
                     c.len_k,          c.head_dim,       c.scale,         std::move(segments),
                     strides_of(c.q),  strides_of(c.k),  strides_of(c.v), tessel::threads_for(flops, c.num_threads)};
  p.o = strides_of(c.o);
  p.g = strides_of(c.g);
  return p;
}

// In: the table's element type; K: the kernels' (tessel::Bf16, tessel::Half for the half types' bits).
template <typename In, typename K, typename T>
void table_attention_forward(const tessel::AttentionCall* c, const In* q, const In* k, const In* v, T* out, T* lse) {
  tessel::attention_forward_cpu<K>(problem_of(*c), as<K>(q), as<K>(k), as<K>(v), out, lse);
}

template <typename In, typename K, typename T>
void table_attention_backward(const tessel::AttentionCall* c, const In* q, const In* k, const In* v, const T* out,
                              const In* dout, const T* lse, const T* dlse, T* dq, T* dk, T* dv) {
  tessel::attention_backward_cpu<K>(problem_of(*c), as<K>(q), as<K>(k), as<K>(v), out, as<K>(dout),
                                    strides_of(c->dout), lse, dlse, dq, dk, dv);
}

template <typename In, typename K, typename T = tessel::acc_t<K>>
constexpr tessel::AttentionKernels<In, T> attention_kernels() {
  return {&table_attention_forward<In, K, T>, &table_attention_backward<In, K, T>};
}

tessel::LinearProblem problem_of(const tessel::LinearCall& c) {
  const double flops = 4.0 * c.batch * c.heads * std::max(c.len_q, c.len_k) * c.dim * c.dim_v;
  tessel::LinearProblem p{c.batch,         c.heads,         c.kv_heads,      c.len_q,
                          c.len_k,         c.dim,           c.dim_v,         c.scale,
                          c.causal != 0,   strides_of(c.q), strides_of(c.k), strides_of(c.v),
                          tessel::threads_for(flops, c.num_threads)};
  if (c.bounds) p.bounds.assign(c.bounds, c.bounds + c.num_bounds);
  return p;
}

template <typename T>
void table_linear_forward(const tessel::LinearCall* c, const T* q, const T* k, const T* v, const T* state0, T* out,
                          T* state_out) {
  tessel::linear_forward_cpu<T>(problem_of(*c), q, k, v, state0, out, state_out);
}

template <typename T>
void table_linear_backward(const tessel::LinearCall* c, const T* q, const T* k, const T* v, const T* state0,
                           const T* state_final, const T* dout, const T* dstate, T* dq, T* dk, T* dv, T* dstate0) {
  tessel::linear_backward_cpu<T>(problem_of(*c), q, k, v, state0, state_final, dout, strides_of(c->dout), dstate,
                                 dq, dk, dv, dstate0);
}

const tessel::KernelTable kKernelTable{
    tessel::kKernelTableVersion,
    TESSEL_LEVEL,
    attention_kernels<float, float>(),
    attention_kernels<double, double>(),
    attention_kernels<uint16_t, tessel::Bf16>(),
    attention_kernels<uint16_t, tessel::Half>(),
    {&table_linear_forward<float>, &table_linear_backward<float>},
    {&table_linear_forward<double>, &table_linear_backward<double>},
};

// The SIMD levels this CPU runs, lowest first (x86-64-v2, v3 and v4 by their features; v4 with AVX512-BF16).
std::vector<std::string> cpu_levels() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  std::vector<std::string> levels;
  const bool v2 = __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt");
  const bool v3 = v2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  if (v2) levels.push_back("sse");
  if (v3) levels.push_back("avx2");
  if (v4) levels.push_back("avx512");
  if (v4 && __builtin_cpu_supports("avx512bf16")) levels.push_back("avx512bf16");
  return levels;
#else
  return {TESSEL_LEVEL};
#endif
}

// The float32 multiply-add rate of num_threads threads at this level, in GFLOP/s: `steps` steps of
// independent chains on each thread (12 vectors: more than an FMA's latency times the FMA units of any
// x86 core), no memory traffic. The ceiling the kernels' matmuls are measured against (python -m bench).
double fma_peak_gflops(int num_threads, int64_t steps) {
  using S = tessel::Simd<float>;
  constexpr int kChains = 12;
  std::atomic<int> threads{0};
  std::atomic<float> sink{0};
  const auto start = std::chrono::steady_clock::now();
  tessel::parallel_region(num_threads, [&] {
    S::vec acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = S::splat(1.0f + 1e-6f * i);
    const S::vec a = S::splat(0.999999f), b = S::splat(1e-7f);
    for (int64_t s = 0; s < steps; ++s)
#pragma GCC unroll 12
      for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * a + b;
    float total = 0;
    for (int i = 0; i < kChains; ++i) total += acc[i][0];
    sink = sink + total;  // keeps the chains from being optimised away
    ++threads;
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return threads.load() * double(steps) * kChains * S::width * 2 / seconds / 1e9;
}

}  // namespace

// One module per SIMD level (setup.py): TESSEL_MODULE is its name, e.g. _C_avx2.
PYBIND11_MODULE(TESSEL_MODULE, m) {
  m.doc() = "tessel CPU kernels (C++17, OpenMP, SIMD) for one SIMD level";
  m.attr("level") = TESSEL_LEVEL;
  m.attr("simd_bytes") = tessel::kVecBytes;
  m.def("cpu_levels", &cpu_levels);
  m.def("kernel_table", [] { return py::capsule(&kKernelTable, "tessel.KernelTable"); });
  m.def(
      "release_scratch",
      [](int num_threads) {
        // Each OpenMP thread (the caller among them) gives back its own cached blocks.
        std::atomic<size_t> bytes{0};
        tessel::parallel_region(num_threads, [&] { bytes += tessel::BlockCache::clear(); });
        return bytes.load();
      },
      py::arg("num_threads"));
  m.def("fma_peak_gflops", &fma_peak_gflops, py::arg("num_threads"), py::arg("steps"));
  m.def("looped_forward", &looped_forward, py::arg("z"), py::arg("p"), py::arg("q"), py::arg("out"),
        py::arg("saved"), py::arg("loops"), py::arg("key_cols"), py::arg("inv_n"), py::arg("every"),
        py::arg("num_threads"));
  m.def("looped_backward", &looped_backward, py::arg("saved"), py::arg("p"), py::arg("q"), py::arg("dout"),
        py::arg("dz"), py::arg("dp"), py::arg("dq"), py::arg("loops"), py::arg("key_cols"), py::arg("inv_n"),
        py::arg("every"), py::arg("num_threads"));
  m.def("compress_project", &compress_project, py::arg("grads"), py::arg("errors"), py::arg("p"), py::arg("q"),
        py::arg("rank"), py::arg("onto_p"), py::arg("num_threads"));
  m.def("compress_reconstruct", &compress_reconstruct, py::arg("grads"), py::arg("errors"), py::arg("p_out"),
        py::arg("q_out"), py::arg("p_err"), py::arg("q_err"), py::arg("keep"), py::arg("rank"),
        py::arg("num_threads"));
  m.def("orthonormalize", &orthonormalize, py::arg("buf"), py::arg("offsets"), py::arg("lengths"), py::arg("rank"),
        py::arg("vector_stride"), py::arg("element_stride"), py::arg("eps"), py::arg("num_threads"));
}
