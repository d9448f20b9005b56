// tessel._C_ops: the attention and linear-attention ops in torch's
// dispatcher, so that a call goes from Python to the kernel through C++ alone
// (no Python dispatch, no numpy).
//
//   tessel::attention_fwd / _bwd          dense (B, H, N, D) batches
//   tessel::attention_varlen_fwd / _bwd   packed sequences (total, H, D)
//   tessel::linear_attention_fwd / _bwd   linear attention, dense or packed (cu_seqlens)
//
// Per op: its schema; the CPU and CUDA kernels, which run the C++ kernels of
// the SIMD level tessel chose (through its KernelTable) when backend is "cpp"
// and otherwise the Triton kernels (Python callables that tessel.attention
// and tessel.linear_attention set: CUDA tensors, or CPU tensors in Triton's
// interpreter); and autograd (a C++ autograd Function whose backward is the
// _bwd op). The fakes that torch.compile traces with are registered in Python
// (tessel.attention, tessel.linear_attention).
//
// User input is validated in Python before an op is called; the checks here
// are internal invariants (a wrong caller gets a RuntimeError, never memory
// corruption). Built once against the installed torch, without -march.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <tuple>
#include <vector>

#include "kernel_table.h"

namespace py = pybind11;
using at::Tensor;

namespace {

std::atomic<const tessel::KernelTable*> kernel_table{nullptr};

// Python callables of the Triton path, by op name; leaked on purpose (they live as long as the process, and
// must not be released after the interpreter is gone).
struct TritonKernels {
  PyObject* attention_fwd = nullptr;
  PyObject* attention_bwd = nullptr;
  PyObject* attention_varlen_fwd = nullptr;
  PyObject* attention_varlen_bwd = nullptr;
  PyObject* linear_attention_fwd = nullptr;
  PyObject* linear_attention_bwd = nullptr;

  PyObject** slot(const std::string& op) {
    if (op == "attention_fwd") return &attention_fwd;
    if (op == "attention_bwd") return &attention_bwd;
    if (op == "attention_varlen_fwd") return &attention_varlen_fwd;
    if (op == "attention_varlen_bwd") return &attention_varlen_bwd;
    if (op == "linear_attention_fwd") return &linear_attention_fwd;
    if (op == "linear_attention_bwd") return &linear_attention_bwd;
    throw std::invalid_argument("no tessel op " + op + " runs Triton kernels");
  }
} triton;

[[noreturn]] void internal_error(const char* op, const std::string& what) {
  TORCH_CHECK(false, "tessel::", op, ": internal check failed: ", what);
}

const tessel::KernelTable& kernels() {
  if (const auto* table = kernel_table.load()) return *table;
  {
    // Called before tessel chose its SIMD level: tessel._dispatch chooses it and hands the table over.
    py::gil_scoped_acquire gil;
    py::module_::import("tessel._dispatch").attr("cpp_module")();
  }
  const auto* table = kernel_table.load();
  if (!table) internal_error("kernels", "tessel._dispatch.cpp_module() set no kernel table");
  return *table;
}

void set_kernel_table(const py::capsule& capsule) {
  if (std::string(capsule.name() ? capsule.name() : "") != "tessel.KernelTable")
    throw std::invalid_argument("set_kernel_table takes the capsule of a tessel._C_<level>.kernel_table()");
  const auto* table = capsule.get_pointer<const tessel::KernelTable>();
  if (table->version != tessel::kKernelTableVersion)
    throw std::runtime_error(std::string("tessel._C_") + table->level +
                             " was built from other sources than tessel._C_ops: rebuild tessel");
  kernel_table.store(table);
}

std::string kernel_level() {
  const auto* table = kernel_table.load();
  return table ? table->level : "";
}

template <typename Result, typename... Args>
Result call_triton(const char* op, PyObject* fn, Args&&... args) {
  py::gil_scoped_acquire gil;
  if (!fn) internal_error(op, "no Triton kernel was set (import tessel first)");
  return py::reinterpret_borrow<py::function>(fn)(std::forward<Args>(args)...).template cast<Result>();
}

// ---------------------------------------------------------------- the C++ kernels' glue

at::ScalarType work_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The dtype the attention kernels read x's operands in: the half types as given (converted while
// packing), float32 and float64 as they are.
at::ScalarType input_dtype(const Tensor& x) {
  const auto t = x.scalar_type();
  return t == at::kBFloat16 || t == at::kHalf ? t : work_dtype(x);
}

const uint16_t* half_bits(const Tensor& x) { return reinterpret_cast<const uint16_t*>(x.const_data_ptr()); }

// The kernels of inputs in `in` that the table holds for the half types.
const tessel::AttentionKernels<uint16_t, float>& half_kernels(const tessel::KernelTable& table, at::ScalarType in) {
  return in == at::kBFloat16 ? table.attention_bf16 : table.attention_f16;
}

// x in the kernels' dtype with a contiguous last dim (x itself when it is already).
Tensor as_work(const Tensor& x, at::ScalarType work) {
  Tensor w = x.scalar_type() == work ? x : x.to(work);
  return w.size(-1) <= 1 || w.stride(-1) == 1 ? w : w.contiguous();
}

void strides3(const Tensor& x, int64_t* out) {
  for (int i = 0; i < 3; ++i) out[i] = x.stride(i);
}

// q (B, H, Nq, D), k (B, Hkv, Nk, D) and v (B, Hkv, Nk, Dv), H a multiple of Hkv, all CPU tensors of one
// dtype; Dv == D unless any_dim_v.
void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, bool any_dim_v = false) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) internal_error(op, "q, k, v must be 4-D");
  if (!q.device().is_cpu() || !k.device().is_cpu() || !v.device().is_cpu())
    internal_error(op, "backend 'cpp' takes CPU tensors");
  if (k.scalar_type() != q.scalar_type() || v.scalar_type() != q.scalar_type())
    internal_error(op, "q, k, v must share a dtype");
  if (k.size(0) != q.size(0) || k.size(3) != q.size(3) || !v.sizes().slice(0, 3).equals(k.sizes().slice(0, 3)) ||
      (!any_dim_v && v.size(3) != k.size(3)) || k.size(1) < 1 || q.size(1) % k.size(1) != 0)
    internal_error(op, "shapes " + c10::str(q.sizes(), k.sizes(), v.sizes()) + " do not fit");
}

void check_shape(const char* op, const char* name, const Tensor& x, at::IntArrayRef shape) {
  if (!x.sizes().equals(shape)) internal_error(op, std::string(name) + " has shape " + c10::str(x.sizes()));
}

// Segments (kernel_table.h): `count` rows of six, consecutive and covering both sequence axes.
struct Segments {
  const int64_t* rows;
  int64_t count;
};

void check_segments(const char* op, Segments segments, int64_t len_q, int64_t len_k) {
  const int64_t* r = segments.rows;
  int64_t q_end = 0, k_end = 0;
  for (int64_t s = 0; s < segments.count; ++s, r += 6) {
    if (r[0] != q_end || r[2] != k_end || r[1] < 0 || r[3] < 0)
      internal_error(op, "segment " + std::to_string(s) + " does not continue the previous one");
    q_end += r[1];
    k_end += r[3];
  }
  if (q_end != len_q || k_end != len_k) internal_error(op, "segments do not cover the sequence axes");
}

// A varlen op's segments tensor: CPU int64 (S, 6), contiguous.
Segments segments_of(const char* op, const Tensor& segments) {
  if (segments.scalar_type() != at::kLong || segments.dim() != 2 || segments.size(1) != 6 ||
      !segments.device().is_cpu() || !segments.is_contiguous())
    internal_error(op, "segments must be a contiguous CPU int64 (S, 6) tensor");
  return {segments.data_ptr<int64_t>(), segments.size(0)};
}

// The fields of a kernel call (AttentionCall, LinearCall) that every family fills alike.
template <typename Call>
Call call_of(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  Call c{};
  c.batch = q.size(0);
  c.heads = q.size(1);
  c.kv_heads = k.size(1);
  c.len_q = q.size(2);
  c.len_k = k.size(2);
  c.scale = scale;
  strides3(q, c.q);
  strides3(k, c.k);
  strides3(v, c.v);
  c.num_threads = at::get_num_threads();
  return c;
}

tessel::AttentionCall attention_call(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                     Segments segments) {
  auto c = call_of<tessel::AttentionCall>(q, k, v, scale);
  c.head_dim = q.size(3);
  c.segments = segments.rows;
  c.num_segments = segments.count;
  return c;
}

// The forward over (B, H, N, D) views of any strides (a packed batch's too); writes out, returns lse
// (B, H, Nq). `out` is in the work dtype with a contiguous last dim.
Tensor forward_cpp(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                   Segments segments, const Tensor& out) {
  check_qkv(op, q, k, v);
  check_segments(op, segments, q.size(2), k.size(2));
  const auto work = work_dtype(q), in = input_dtype(q);
  const Tensor qw = as_work(q, in), kw = as_work(k, in), vw = as_work(v, in);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(work));
  tessel::AttentionCall c = attention_call(qw, kw, vw, scale, segments);
  strides3(out, c.o);
  const auto& table = kernels();
  if (in == at::kBFloat16 || in == at::kHalf)
    half_kernels(table, in).forward(&c, half_bits(qw), half_bits(kw), half_bits(vw), out.data_ptr<float>(),
                                    lse.data_ptr<float>());
  else if (work == at::kDouble)
    table.attention_f64.forward(&c, qw.data_ptr<double>(), kw.data_ptr<double>(), vw.data_ptr<double>(),
                                out.data_ptr<double>(), lse.data_ptr<double>());
  else
    table.attention_f32.forward(&c, qw.data_ptr<float>(), kw.data_ptr<float>(), vw.data_ptr<float>(),
                                out.data_ptr<float>(), lse.data_ptr<float>());
  return lse;
}

// The backward over (B, H, N, D) views; writes dq (out's layout), dk and dv (one layout), all in the work dtype.
void backward_cpp(const char* op, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                  const Tensor& out, const Tensor& lse, const std::optional<Tensor>& dlse, double scale,
                  Segments segments, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  check_qkv(op, q, k, v);
  check_segments(op, segments, q.size(2), k.size(2));
  check_shape(op, "dout", dout, q.sizes());
  check_shape(op, "out", out, q.sizes());
  check_shape(op, "lse", lse, q.sizes().slice(0, 3));
  if (dlse) check_shape(op, "dlse", *dlse, q.sizes().slice(0, 3));
  const auto work = work_dtype(q), in = input_dtype(q);
  const Tensor qw = as_work(q, in), kw = as_work(k, in), vw = as_work(v, in), dw = as_work(dout, in);
  // The kernel reads out in dq's layout.
  Tensor ow = out.scalar_type() == work && out.strides().equals(dq.strides()) ? out
                                                                                : at::empty_like(dq).copy_(out);
  const Tensor lw = lse.to(work).contiguous();
  const Tensor dlw = dlse ? dlse->to(work).contiguous() : Tensor();
  tessel::AttentionCall c = attention_call(qw, kw, vw, scale, segments);
  strides3(dq, c.o);
  strides3(dk, c.g);
  strides3(dw, c.dout);
  const auto& table = kernels();
  if (in == at::kBFloat16 || in == at::kHalf)
    half_kernels(table, in).backward(&c, half_bits(qw), half_bits(kw), half_bits(vw), ow.data_ptr<float>(),
                                     half_bits(dw), lw.data_ptr<float>(), dlse ? dlw.data_ptr<float>() : nullptr,
                                     dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>());
  else if (work == at::kDouble)
    table.attention_f64.backward(&c, qw.data_ptr<double>(), kw.data_ptr<double>(), vw.data_ptr<double>(),
                                 ow.data_ptr<double>(), dw.data_ptr<double>(), lw.data_ptr<double>(),
                                 dlse ? dlw.data_ptr<double>() : nullptr, dq.data_ptr<double>(),
                                 dk.data_ptr<double>(), dv.data_ptr<double>());
  else
    table.attention_f32.backward(&c, qw.data_ptr<float>(), kw.data_ptr<float>(), vw.data_ptr<float>(),
                                 ow.data_ptr<float>(), dw.data_ptr<float>(), lw.data_ptr<float>(),
                                 dlse ? dlw.data_ptr<float>() : nullptr, dq.data_ptr<float>(),
                                 dk.data_ptr<float>(), dv.data_ptr<float>());
}

Tensor in_dtype(const Tensor& x, const Tensor& like) {
  return x.scalar_type() == like.scalar_type() ? x : x.to(like.scalar_type());
}

// (total, H, D) as the (1, H, total, D) view the kernels take.
Tensor as_batch(const Tensor& x) { return x.transpose(0, 1).unsqueeze(0); }

// The linear-attention states' shape: (states, Hkv, D, Dv), a state per batch element or packed sequence.
std::vector<int64_t> linear_state_shape(const Tensor& k, const Tensor& v, const std::optional<Tensor>& cu_seqlens) {
  return {cu_seqlens ? cu_seqlens->size(0) - 1 : k.size(0), k.size(1), k.size(3), v.size(3)};
}

// cu_seqlens as the kernels read it (CPU int64, from 0 to Nq, never decreasing, a batch of one with
// Nq == Nk), or an undefined tensor.
Tensor linear_bounds(const char* op, const std::optional<Tensor>& cu_seqlens, const Tensor& q, const Tensor& k) {
  if (!cu_seqlens) return Tensor();
  if (cu_seqlens->dim() != 1 || cu_seqlens->size(0) < 2 || !cu_seqlens->device().is_cpu() ||
      !at::isIntegralType(cu_seqlens->scalar_type(), false))
    internal_error(op, "cu_seqlens must be a 1-D CPU integer tensor of at least 2 values");
  const Tensor b = cu_seqlens->to(at::kLong).contiguous();
  const int64_t* v = b.const_data_ptr<int64_t>();
  const int64_t n = b.size(0);
  bool ordered = v[0] == 0 && v[n - 1] == q.size(2) && q.size(0) == 1 && q.size(2) == k.size(2);
  for (int64_t i = 1; i < n && ordered; ++i) ordered = v[i] >= v[i - 1];
  if (!ordered) internal_error(op, "cu_seqlens must run from 0 to the length of a batch of one, with Nq == Nk");
  return b;
}

// An optional state of `shape` in the work dtype, contiguous (undefined when absent).
Tensor linear_state(const char* op, const char* name, const std::optional<Tensor>& x, at::IntArrayRef shape,
                    at::ScalarType work) {
  if (!x) return Tensor();
  if (!x->device().is_cpu()) internal_error(op, std::string(name) + " must be a CPU tensor");
  check_shape(op, name, *x, shape);
  return x->to(work).contiguous();
}

tessel::LinearCall linear_call(const Tensor& q, const Tensor& k, const Tensor& v, double scale, bool causal,
                               const Tensor& bounds) {
  auto c = call_of<tessel::LinearCall>(q, k, v, scale);
  c.dim = q.size(3);
  c.dim_v = v.size(3);
  c.causal = causal;
  c.bounds = bounds.defined() ? bounds.const_data_ptr<int64_t>() : nullptr;
  c.num_bounds = bounds.defined() ? bounds.size(0) : 0;
  return c;
}

template <typename T>
const tessel::LinearKernels<T>& linear_kernels() {
  if constexpr (std::is_same_v<T, double>)
    return kernels().linear_f64;
  else
    return kernels().linear_f32;
}

// Calls fn(T{}) with the work dtype's element type.
template <typename Fn>
void by_work_dtype(at::ScalarType work, Fn&& fn) {
  if (work == at::kDouble)
    fn(double{});
  else
    fn(float{});
}

template <typename T>
const T* data_or_null(const Tensor& x) {
  return x.defined() ? x.const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------- the ops' kernels (CPU and CUDA keys)

using Pair = std::tuple<Tensor, Tensor>;
using Triple = std::tuple<Tensor, Tensor, Tensor>;

Pair attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t band_lo,
                   int64_t band_hi, c10::string_view backend) {
  if (backend != "cpp")
    return call_triton<Pair>("attention_fwd", triton.attention_fwd, q, k, v, scale, band_lo, band_hi);
  constexpr const char* op = "attention_fwd";
  if (q.dim() != 4 || k.dim() != 4) internal_error(op, "q, k, v must be 4-D");
  const int64_t segment[6] = {0, q.size(2), 0, k.size(2), band_lo, band_hi};  // a dense batch is one segment
  Tensor out = at::empty(q.sizes(), q.options().dtype(work_dtype(q)));
  Tensor lse = forward_cpp(op, q, k, v, scale, {segment, 1}, out);
  return {in_dtype(out, q), lse};
}

Triple attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                     const Tensor& lse, const std::optional<Tensor>& dlse, double scale, int64_t band_lo,
                     int64_t band_hi, c10::string_view backend) {
  if (backend != "cpp")
    return call_triton<Triple>("attention_bwd", triton.attention_bwd, dout, q, k, v, out, lse, dlse, scale, band_lo,
                               band_hi);
  constexpr const char* op = "attention_bwd";
  if (q.dim() != 4 || k.dim() != 4) internal_error(op, "q, k, v must be 4-D");
  const auto opts = q.options().dtype(work_dtype(q));
  Tensor dq = at::empty(q.sizes(), opts), dk = at::empty(k.sizes(), opts), dv = at::empty(k.sizes(), opts);
  const int64_t segment[6] = {0, q.size(2), 0, k.size(2), band_lo, band_hi};
  backward_cpp(op, dout, q, k, v, out, lse, dlse, scale, {segment, 1}, dq, dk, dv);
  return {in_dtype(dq, q), in_dtype(dk, k), in_dtype(dv, v)};
}

Pair attention_varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& segments,
                          int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, c10::string_view backend) {
  if (backend != "cpp")
    return call_triton<Pair>("attention_varlen_fwd", triton.attention_varlen_fwd, q, k, v, segments, max_seqlen_q,
                             max_seqlen_k, scale);
  constexpr const char* op = "attention_varlen_fwd";
  if (q.dim() != 3 || k.dim() != 3 || v.dim() != 3) internal_error(op, "q, k, v must be 3-D");
  // Written in the packed layout, through the strides of its batch view.
  Tensor out = at::empty(q.sizes(), q.options().dtype(work_dtype(q)));
  Tensor lse =
      forward_cpp(op, as_batch(q), as_batch(k), as_batch(v), scale, segments_of(op, segments), as_batch(out));
  return {in_dtype(out, q), lse[0]};
}

Triple attention_varlen_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                            const Tensor& out, const Tensor& lse, const std::optional<Tensor>& dlse,
                            const Tensor& segments, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                            c10::string_view backend) {
  if (backend != "cpp")
    return call_triton<Triple>("attention_varlen_bwd", triton.attention_varlen_bwd, dout, q, k, v, out, lse, dlse,
                               segments, max_seqlen_q, max_seqlen_k, scale);
  constexpr const char* op = "attention_varlen_bwd";
  if (q.dim() != 3 || k.dim() != 3 || v.dim() != 3 || lse.dim() != 2)
    internal_error(op, "q, k, v must be 3-D and lse 2-D");
  const auto opts = q.options().dtype(work_dtype(q));
  Tensor dq = at::empty(q.sizes(), opts), dk = at::empty(k.sizes(), opts), dv = at::empty(k.sizes(), opts);
  const std::optional<Tensor> dlse_batch = dlse ? std::optional<Tensor>(dlse->unsqueeze(0)) : std::nullopt;
  backward_cpp(op, as_batch(dout), as_batch(q), as_batch(k), as_batch(v), as_batch(out), lse.unsqueeze(0),
               dlse_batch, scale, segments_of(op, segments), as_batch(dq), as_batch(dk), as_batch(dv));
  return {in_dtype(dq, q), in_dtype(dk, k), in_dtype(dv, v)};
}

using Quad = std::tuple<Tensor, Tensor, Tensor, Tensor>;

Pair linear_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& state0,
                          const std::optional<Tensor>& cu_seqlens, double scale, bool causal,
                          c10::string_view backend) {
  if (backend != "cpp")
    return call_triton<Pair>("linear_attention_fwd", triton.linear_attention_fwd, q, k, v, state0, cu_seqlens, scale,
                             causal);
  constexpr const char* op = "linear_attention_fwd";
  check_qkv(op, q, k, v, true);
  if (causal && q.size(2) != k.size(2)) internal_error(op, "causal needs as many queries as keys");
  const Tensor bounds = linear_bounds(op, cu_seqlens, q, k);
  const auto work = work_dtype(q);
  const auto shape = linear_state_shape(k, v, cu_seqlens);
  const Tensor qw = as_work(q, work), kw = as_work(k, work), vw = as_work(v, work);
  const Tensor s0 = linear_state(op, "state0", state0, shape, work);
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options().dtype(work));
  Tensor state = at::empty(shape, q.options().dtype(work));
  const tessel::LinearCall c = linear_call(qw, kw, vw, scale, causal, bounds);
  by_work_dtype(work, [&](auto t) {
    using T = decltype(t);
    linear_kernels<T>().forward(&c, qw.const_data_ptr<T>(), kw.const_data_ptr<T>(), vw.const_data_ptr<T>(),
                                data_or_null<T>(s0), out.data_ptr<T>(), state.data_ptr<T>());
  });
  return {in_dtype(out, q), state};
}

// state: the forward's final state (the non-causal backward reads it as S). The state gradient comes in the
// work dtype whether or not there was a state0.
Quad linear_attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& state0,
                          const std::optional<Tensor>& cu_seqlens, const Tensor& state, const Tensor& dout,
                          const std::optional<Tensor>& dstate, double scale, bool causal, c10::string_view backend) {
  if (backend != "cpp")
    return call_triton<Quad>("linear_attention_bwd", triton.linear_attention_bwd, q, k, v, state0, cu_seqlens, state,
                             dout, dstate, scale, causal);
  constexpr const char* op = "linear_attention_bwd";
  check_qkv(op, q, k, v, true);
  if (causal && q.size(2) != k.size(2)) internal_error(op, "causal needs as many queries as keys");
  check_shape(op, "dout", dout, {q.size(0), q.size(1), q.size(2), v.size(3)});
  const Tensor bounds = linear_bounds(op, cu_seqlens, q, k);
  const auto work = work_dtype(q);
  const auto shape = linear_state_shape(k, v, cu_seqlens);
  const Tensor qw = as_work(q, work), kw = as_work(k, work), vw = as_work(v, work), dw = as_work(dout, work);
  const Tensor s0 = linear_state(op, "state0", state0, shape, work);
  const Tensor sf = linear_state(op, "state", state, shape, work);
  const Tensor ds = linear_state(op, "dstate", dstate, shape, work);
  const auto opts = q.options().dtype(work);
  Tensor dq = at::empty(q.sizes(), opts), dk = at::empty(k.sizes(), opts), dv = at::empty(v.sizes(), opts);
  Tensor ds0 = at::empty(shape, opts);
  tessel::LinearCall c = linear_call(qw, kw, vw, scale, causal, bounds);
  strides3(dw, c.dout);
  by_work_dtype(work, [&](auto t) {
    using T = decltype(t);
    linear_kernels<T>().backward(&c, qw.const_data_ptr<T>(), kw.const_data_ptr<T>(), vw.const_data_ptr<T>(),
                                 data_or_null<T>(s0), sf.const_data_ptr<T>(), dw.const_data_ptr<T>(),
                                 data_or_null<T>(ds), dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(),
                                 ds0.data_ptr<T>());
  });
  return {in_dtype(dq, q), in_dtype(dk, k), in_dtype(dv, v), ds0};
}

// ---------------------------------------------------------------- autograd

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::TypedOperatorHandle<Pair(const Tensor&, const Tensor&, const Tensor&, double, c10::SymInt, c10::SymInt,
                              c10::string_view)>
fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tessel::attention_fwd", "")
                             .typed<Pair(const Tensor&, const Tensor&, const Tensor&, double, c10::SymInt,
                                         c10::SymInt, c10::string_view)>();
  return op;
}

// The autograd of both forward ops: out and lse are differentiable; a gradient that did not flow stays
// undefined (dout then zeros, dlse None).
template <typename Ops>
struct AttentionFunction : public torch::autograd::Function<AttentionFunction<Ops>> {
  template <typename... Args>
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               Args... args) {
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = Ops::forward(q, k, v, args...);
    ctx->save_for_backward({q, k, v, out, lse});
    Ops::save(ctx, args...);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& out = saved[3];
    const Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const std::optional<Tensor> dlse = grads[1].defined() ? std::optional<Tensor>(grads[1]) : std::nullopt;
    auto [dq, dk, dv] = Ops::backward(ctx, dout, saved[0], saved[1], saved[2], out, saved[4], dlse);
    variable_list result{dq, dk, dv};
    result.resize(3 + Ops::kExtraArgs);  // no gradient for the other arguments
    return result;
  }
};

struct DenseOps {
  static constexpr int kExtraArgs = 4;
  static Pair forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, c10::SymInt lo,
                      c10::SymInt hi, c10::string_view backend) {
    return fwd_op().call(q, k, v, scale, std::move(lo), std::move(hi), backend);
  }
  static void save(AutogradContext* ctx, double scale, const c10::SymInt& lo, const c10::SymInt& hi,
                   c10::string_view backend) {
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["lo"] = lo;
    ctx->saved_data["hi"] = hi;
    ctx->saved_data["backend"] = std::string(backend);
  }
  static Triple backward(AutogradContext* ctx, const Tensor& dout, const Tensor& q, const Tensor& k,
                         const Tensor& v, const Tensor& out, const Tensor& lse, const std::optional<Tensor>& dlse) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("tessel::attention_bwd", "")
                               .typed<Triple(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             const Tensor&, const Tensor&, const std::optional<Tensor>&, double,
                                             c10::SymInt, c10::SymInt, c10::string_view)>();
    auto& d = ctx->saved_data;
    const std::string backend = d["backend"].toStringRef();
    return op.call(dout, q, k, v, out, lse, dlse, d["scale"].toDouble(), d["lo"].toSymInt(), d["hi"].toSymInt(),
                   backend);
  }
};

struct VarlenOps {
  static constexpr int kExtraArgs = 5;
  static Pair forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& segments,
                      c10::SymInt max_q, c10::SymInt max_k, double scale, c10::string_view backend) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("tessel::attention_varlen_fwd", "")
                               .typed<Pair(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::SymInt,
                                           c10::SymInt, double, c10::string_view)>();
    return op.call(q, k, v, segments, std::move(max_q), std::move(max_k), scale, backend);
  }
  static void save(AutogradContext* ctx, const Tensor& segments, const c10::SymInt& max_q,
                   const c10::SymInt& max_k, double scale, c10::string_view backend) {
    ctx->saved_data["segments"] = segments;
    ctx->saved_data["max_q"] = max_q;
    ctx->saved_data["max_k"] = max_k;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["backend"] = std::string(backend);
  }
  static Triple backward(AutogradContext* ctx, const Tensor& dout, const Tensor& q, const Tensor& k,
                         const Tensor& v, const Tensor& out, const Tensor& lse, const std::optional<Tensor>& dlse) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("tessel::attention_varlen_bwd", "")
                               .typed<Triple(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                             const Tensor&, c10::SymInt, c10::SymInt, double, c10::string_view)>();
    auto& d = ctx->saved_data;
    const std::string backend = d["backend"].toStringRef();
    return op.call(dout, q, k, v, out, lse, dlse, d["segments"].toTensor(), d["max_q"].toSymInt(),
                   d["max_k"].toSymInt(), d["scale"].toDouble(), backend);
  }
};

bool records_graph(const Tensor& q, const Tensor& k, const Tensor& v) {
  return at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
}

// Without a graph to record, straight to the kernel: a Function costs a node even then.
template <typename Ops, typename... Args>
Pair forward_autograd(const Tensor& q, const Tensor& k, const Tensor& v, Args&&... args) {
  if (!records_graph(q, k, v)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return Ops::forward(q, k, v, std::forward<Args>(args)...);
  }
  auto r = AttentionFunction<Ops>::apply(q, k, v, std::forward<Args>(args)...);
  return {r[0], r[1]};
}

Pair attention_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v, double scale, c10::SymInt band_lo,
                            c10::SymInt band_hi, c10::string_view backend) {
  return forward_autograd<DenseOps>(q, k, v, scale, std::move(band_lo), std::move(band_hi), backend);
}

Pair attention_varlen_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& segments,
                                   c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double scale,
                                   c10::string_view backend) {
  return forward_autograd<VarlenOps>(q, k, v, segments, std::move(max_seqlen_q), std::move(max_seqlen_k), scale,
                                     backend);
}

c10::TypedOperatorHandle<Pair(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                              const std::optional<Tensor>&, double, bool, c10::string_view)>
linear_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tessel::linear_attention_fwd", "")
                             .typed<Pair(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                         const std::optional<Tensor>&, double, bool, c10::string_view)>();
  return op;
}

std::optional<Tensor> defined_or_none(const Tensor& x) {
  return x.defined() ? std::optional<Tensor>(x) : std::nullopt;
}

// Linear attention's autograd: out and the final state are differentiable, in q, k, v and state0.
struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const std::optional<Tensor>& state0, const std::optional<Tensor>& cu_seqlens,
                               double scale, bool causal, c10::string_view backend) {
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, state] = linear_fwd_op().call(q, k, v, state0, cu_seqlens, scale, causal, backend);
    ctx->save_for_backward({q, k, v, state0.value_or(Tensor()), cu_seqlens.value_or(Tensor()), state});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["backend"] = std::string(backend);
    return {out, state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("tessel::linear_attention_bwd", "")
                               .typed<Quad(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                           const std::optional<Tensor>&, const Tensor&, const Tensor&,
                                           const std::optional<Tensor>&, double, bool, c10::string_view)>();
    const auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &state0 = saved[3];
    const Tensor dout =
        grads[0].defined() ? grads[0] : at::zeros({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
    auto& d = ctx->saved_data;
    const std::string backend = d["backend"].toStringRef();
    auto [dq, dk, dv, ds0] = op.call(q, k, v, defined_or_none(state0), defined_or_none(saved[4]), saved[5], dout,
                                     defined_or_none(grads[1]), d["scale"].toDouble(), d["causal"].toBool(), backend);
    // No gradient for cu_seqlens, scale, causal, backend.
    return {dq, dk, dv, state0.defined() ? ds0 : Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Pair linear_attention_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const std::optional<Tensor>& state0, const std::optional<Tensor>& cu_seqlens,
                                   double scale, bool causal, c10::string_view backend) {
  const bool graph = records_graph(q, k, v) || (at::GradMode::is_enabled() && state0 && state0->requires_grad());
  if (!graph) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_fwd_op().call(q, k, v, state0, cu_seqlens, scale, causal, backend);
  }
  auto r = LinearFunction::apply(q, k, v, state0, cu_seqlens, scale, causal, backend);
  return {r[0], r[1]};
}

// True when q, k, v certainly pass tessel.attention's input checks (check_attention_inputs): plain strided
// tensors of one floating dtype on one device, non-empty, of rank 4 (B, H, N, D), or 3 (total, H, D) when
// packed, with k's batch and head dim, v of k's shape and H a multiple of Hkv. False sends the call to the
// Python checks, which raise the error or pass what this does not look at (subclasses, other layouts).
bool attention_inputs_fit(py::handle q_obj, py::handle k_obj, py::handle v_obj, bool packed) {
  for (py::handle x : {q_obj, k_obj, v_obj})
    if (!THPVariable_CheckExact(x.ptr())) return false;
  const Tensor& q = THPVariable_Unpack(q_obj.ptr());
  const Tensor& k = THPVariable_Unpack(k_obj.ptr());
  const Tensor& v = THPVariable_Unpack(v_obj.ptr());
  const int64_t rank = packed ? 3 : 4;
  const auto dtype = q.scalar_type();
  for (const Tensor* x : {&q, &k, &v}) {
    if (x->layout() != at::kStrided || x->is_nested() || x->dim() != rank || x->scalar_type() != dtype ||
        x->device() != q.device() || x->numel() == 0)
      return false;
  }
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  return (packed || k.size(0) == q.size(0)) && k.size(-1) == q.size(-1) && v.sizes().equals(k.sizes()) &&
         q.size(1) % k.size(1) == 0;
}

}  // namespace

TORCH_LIBRARY(tessel, m) {
  m.set_python_module("tessel.attention");  // registers the fakes
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale, SymInt band_lo, SymInt band_hi, str backend) "
        "-> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
        "float scale, SymInt band_lo, SymInt band_hi, str backend) -> (Tensor, Tensor, Tensor)");
  m.def("attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor segments, SymInt max_seqlen_q, "
        "SymInt max_seqlen_k, float scale, str backend) -> (Tensor, Tensor)");
  m.def("attention_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
        "Tensor segments, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, str backend) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(tessel, m) {
  m.set_python_module("tessel.linear_attention");  // registers the fakes
  m.def("linear_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? state0, Tensor? cu_seqlens, float scale, "
        "bool causal, str backend) -> (Tensor, Tensor)");
  m.def("linear_attention_bwd(Tensor q, Tensor k, Tensor v, Tensor? state0, Tensor? cu_seqlens, Tensor state, "
        "Tensor dout, Tensor? dstate, float scale, bool causal, str backend) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tessel, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd);
  m.impl("linear_attention_fwd", &linear_attention_fwd);
  m.impl("linear_attention_bwd", &linear_attention_bwd);
}

TORCH_LIBRARY_IMPL(tessel, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd);
  m.impl("linear_attention_fwd", &linear_attention_fwd);
  m.impl("linear_attention_bwd", &linear_attention_bwd);
}

TORCH_LIBRARY_IMPL(tessel, Autograd, m) {
  m.impl("attention_fwd", &attention_fwd_autograd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd_autograd);
  m.impl("linear_attention_fwd", &linear_attention_fwd_autograd);
  // Not twice differentiable: a clear error instead of a silently detached gradient.
  m.impl("attention_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("attention_varlen_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("linear_attention_bwd", torch::autograd::autogradNotImplementedFallback());
}

PYBIND11_MODULE(_C_ops, m) {
  m.doc() = "tessel's attention and linear-attention ops in torch's dispatcher (see csrc/ops.cpp)";
  m.def("set_kernel_table", &set_kernel_table, py::arg("table"),
        "Run the C++ kernels of this tessel._C_<level>.kernel_table() from now on.");
  // The eager fast paths of tessel.attention and tessel.linear_attention: the op through the dispatcher
  // (autograd, modes and all) from a pybind call, without torch.ops' generic argument parsing.
  // torch.compile traces torch.ops instead.
  m.def(
      "attention_fwd",
      [](const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t band_lo, int64_t band_hi,
         const std::string& backend) { return fwd_op().call(q, k, v, scale, band_lo, band_hi, backend); },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "linear_attention_fwd",
      [](const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& state0,
         const std::optional<Tensor>& cu_seqlens, double scale, bool causal, const std::string& backend) {
        return linear_fwd_op().call(q, k, v, state0, cu_seqlens, scale, causal, backend);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("attention_inputs_fit", &attention_inputs_fit, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("packed"), "True when q, k, v certainly pass tessel.attention's checks (False: check in Python).");
  m.def("kernel_level", &kernel_level, "The SIMD level whose kernels run ('' before the first choice).");
  m.def(
      "set_triton_kernel",
      [](const std::string& op, py::object fn) {
        PyObject** slot = triton.slot(op);
        Py_XDECREF(*slot);
        *slot = fn.release().ptr();
      },
      py::arg("op"), py::arg("fn"), "The Python callable that op tessel::<op> runs with backend 'triton'.");
}
