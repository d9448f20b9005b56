// tessel._C_ops: the attention ops in torch's dispatcher, so that a call goes
// from Python to the kernel through C++ alone (no Python dispatch, no numpy).
//
//   tessel::attention_fwd / _bwd          dense (B, H, N, D) batches
//   tessel::attention_varlen_fwd / _bwd   packed sequences (total, H, D)
//
// Per op: its schema; the CPU and CUDA kernels, which run the C++ kernels of
// the SIMD level tessel chose (through its KernelTable) when backend is "cpp"
// and otherwise the Triton kernels (Python callables that tessel.attention
// sets: CUDA tensors, or CPU tensors in Triton's interpreter); and autograd
// (a C++ autograd Function whose backward is the _bwd op). The fakes that
// torch.compile traces with are registered in Python (tessel.attention).
//
// User input is validated in Python before an op is called; the checks here
// are internal invariants (a wrong caller gets a RuntimeError, never memory
// corruption). Built once against the installed torch, without -march.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
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
  if (!fn) internal_error(op, "no Triton kernel was set (import tessel.attention first)");
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

// q (B, H, Nq, D), k and v (B, Hkv, Nk, D), H a multiple of Hkv, all CPU tensors of one dtype.
void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) internal_error(op, "q, k, v must be 4-D");
  if (!q.device().is_cpu() || !k.device().is_cpu() || !v.device().is_cpu())
    internal_error(op, "backend 'cpp' takes CPU tensors");
  if (k.scalar_type() != q.scalar_type() || v.scalar_type() != q.scalar_type())
    internal_error(op, "q, k, v must share a dtype");
  if (k.size(0) != q.size(0) || k.size(3) != q.size(3) || !v.sizes().equals(k.sizes()) || k.size(1) < 1 ||
      q.size(1) % k.size(1) != 0)
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

tessel::AttentionCall attention_call(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                     Segments segments) {
  tessel::AttentionCall c{};
  c.batch = q.size(0);
  c.heads = q.size(1);
  c.kv_heads = k.size(1);
  c.len_q = q.size(2);
  c.len_k = k.size(2);
  c.head_dim = q.size(3);
  c.scale = scale;
  c.segments = segments.rows;
  c.num_segments = segments.count;
  strides3(q, c.q);
  strides3(k, c.k);
  strides3(v, c.v);
  c.num_threads = at::get_num_threads();
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

TORCH_LIBRARY_IMPL(tessel, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd);
}

TORCH_LIBRARY_IMPL(tessel, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd);
}

TORCH_LIBRARY_IMPL(tessel, Autograd, m) {
  m.impl("attention_fwd", &attention_fwd_autograd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd_autograd);
  // Not twice differentiable: a clear error instead of a silently detached gradient.
  m.impl("attention_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("attention_varlen_bwd", torch::autograd::autogradNotImplementedFallback());
}

PYBIND11_MODULE(_C_ops, m) {
  m.doc() = "tessel's attention ops in torch's dispatcher (see csrc/ops.cpp)";
  m.def("set_kernel_table", &set_kernel_table, py::arg("table"),
        "Run the C++ kernels of this tessel._C_<level>.kernel_table() from now on.");
  // The eager fast path of tessel.attention: the op through the dispatcher (autograd, modes and all) from
  // a pybind call, without torch.ops' generic argument parsing. torch.compile traces torch.ops instead.
  m.def(
      "attention_fwd",
      [](const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t band_lo, int64_t band_hi,
         const std::string& backend) { return fwd_op().call(q, k, v, scale, band_lo, band_hi, backend); },
      py::call_guard<py::gil_scoped_release>());
  m.def("kernel_level", &kernel_level, "The SIMD level whose kernels run ('' before the first choice).");
  m.def(
      "set_triton_kernels",
      [](py::object fwd, py::object bwd, py::object varlen_fwd, py::object varlen_bwd) {
        auto keep = [](PyObject** slot, py::object fn) {
          Py_XDECREF(*slot);
          *slot = fn.release().ptr();
        };
        keep(&triton.attention_fwd, std::move(fwd));
        keep(&triton.attention_bwd, std::move(bwd));
        keep(&triton.attention_varlen_fwd, std::move(varlen_fwd));
        keep(&triton.attention_varlen_bwd, std::move(varlen_bwd));
      },
      py::arg("attention_fwd"), py::arg("attention_bwd"), py::arg("attention_varlen_fwd"),
      py::arg("attention_varlen_bwd"), "The Python callables of the ops' Triton path (backend 'triton').");
}
