// The one Python module, tessel._C: converts numpy buffers and calls kernels.
// Inputs were validated in Python (pymod/_dispatch.py); nothing here re-checks.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "attention.h"
#include "common.h"
#include "linear_attention.h"
#include "lowrank.h"

namespace py = pybind11;
using tessel::AttentionProblem;
using tessel::Strides4;

namespace {

Strides4 strides4(const py::array& x) {
  const auto item = static_cast<int64_t>(x.itemsize());
  return {x.strides(0) / item, x.strides(1) / item, x.strides(2) / item};
}

template <typename T>
T* data(py::array& x) {
  return static_cast<T*>(x.mutable_data());
}

template <typename T>
const T* cdata(const py::array& x) {
  return static_cast<const T*>(x.data());
}

AttentionProblem attention_problem(const py::array& q, const py::array& k, const py::array& v, double scale,
                                   int64_t band_lo, int64_t band_hi, int num_threads) {
  return AttentionProblem{q.shape(0), q.shape(1),       k.shape(1),  q.shape(2),
                          k.shape(2), q.shape(3),       scale,       band_lo,
                          band_hi,    strides4(q),      strides4(k), strides4(v),
                          num_threads};
}

void attention_forward(const py::array& q, const py::array& k, const py::array& v, py::array out, py::array lse,
                       double scale, int64_t band_lo, int64_t band_hi, int num_threads) {
  const AttentionProblem p = attention_problem(q, k, v, scale, band_lo, band_hi, num_threads);
  const bool is_double = q.dtype().is(py::dtype::of<double>());
  py::gil_scoped_release release;
  if (is_double)
    tessel::attention_forward_cpu<double>(p, cdata<double>(q), cdata<double>(k), cdata<double>(v),
                                          data<double>(out), data<double>(lse));
  else
    tessel::attention_forward_cpu<float>(p, cdata<float>(q), cdata<float>(k), cdata<float>(v), data<float>(out),
                                         data<float>(lse));
}

void attention_backward(const py::array& q, const py::array& k, const py::array& v, const py::array& out,
                        const py::array& dout, const py::array& lse, const py::object& dlse, py::array dq,
                        py::array dk, py::array dv, double scale, int64_t band_lo, int64_t band_hi,
                        int num_threads) {
  const AttentionProblem p = attention_problem(q, k, v, scale, band_lo, band_hi, num_threads);
  const Strides4 ds = strides4(dout);
  const bool is_double = q.dtype().is(py::dtype::of<double>());
  py::array dlse_array = dlse.is_none() ? py::array() : dlse.cast<py::array>();
  const void* dlse_ptr = dlse.is_none() ? nullptr : dlse_array.data();
  py::gil_scoped_release release;
  if (is_double)
    tessel::attention_backward_cpu<double>(p, cdata<double>(q), cdata<double>(k), cdata<double>(v),
                                           cdata<double>(out), cdata<double>(dout), ds, cdata<double>(lse),
                                           static_cast<const double*>(dlse_ptr), data<double>(dq),
                                           data<double>(dk), data<double>(dv));
  else
    tessel::attention_backward_cpu<float>(p, cdata<float>(q), cdata<float>(k), cdata<float>(v), cdata<float>(out),
                                          cdata<float>(dout), ds, cdata<float>(lse),
                                          static_cast<const float*>(dlse_ptr), data<float>(dq), data<float>(dk),
                                          data<float>(dv));
}

tessel::LoopedProblem looped_problem(const py::array& z, const py::array& wp, int64_t loops, int64_t key_cols,
                                     double inv_n, int64_t every, int num_threads) {
  return tessel::LoopedProblem{z.shape(0), z.shape(1), z.shape(2), key_cols, loops,
                               wp.shape(1), wp.shape(0), inv_n,    every,   num_threads};
}

int64_t looped_forward(const py::array& z, const py::array& wp, const py::array& wq, py::array out, py::array saved,
                       int64_t loops, int64_t key_cols, double inv_n, int64_t every, int num_threads) {
  const auto p = looped_problem(z, wp, loops, key_cols, inv_n, every, num_threads);
  const bool is_double = z.dtype().is(py::dtype::of<double>());
  py::gil_scoped_release release;
  if (is_double)
    return tessel::looped_forward_cpu<double>(p, cdata<double>(z), cdata<double>(wp), cdata<double>(wq),
                                              data<double>(out), data<double>(saved));
  return tessel::looped_forward_cpu<float>(p, cdata<float>(z), cdata<float>(wp), cdata<float>(wq), data<float>(out),
                                           data<float>(saved));
}

void looped_backward(const py::array& saved, const py::array& wp, const py::array& wq, const py::array& dout,
                     py::array dz, py::array dp, py::array dq, int64_t loops, int64_t key_cols, double inv_n,
                     int64_t every, int num_threads) {
  const auto p = looped_problem(dout, wp, loops, key_cols, inv_n, every, num_threads);
  const bool is_double = dout.dtype().is(py::dtype::of<double>());
  py::gil_scoped_release release;
  if (is_double)
    tessel::looped_backward_cpu<double>(p, cdata<double>(saved), cdata<double>(wp), cdata<double>(wq),
                                        cdata<double>(dout), data<double>(dz), data<double>(dp), data<double>(dq));
  else
    tessel::looped_backward_cpu<float>(p, cdata<float>(saved), cdata<float>(wp), cdata<float>(wq),
                                       cdata<float>(dout), data<float>(dz), data<float>(dp), data<float>(dq));
}

tessel::LinearProblem linear_problem(const py::array& q, const py::array& k, const py::array& v, double scale,
                                     bool causal, int num_threads) {
  return tessel::LinearProblem{q.shape(0), q.shape(1), k.shape(1),  q.shape(2),  k.shape(2),  q.shape(3),
                               v.shape(3), scale,      causal,      strides4(q), strides4(k), strides4(v),
                               num_threads};
}

template <typename T>
const T* optional_data(const py::object& x) {
  return x.is_none() ? nullptr : static_cast<const T*>(x.cast<py::array>().data());
}

template <typename T>
T* optional_mutable(const py::object& x) {
  return x.is_none() ? nullptr : static_cast<T*>(x.cast<py::array>().mutable_data());
}

template <typename T>
void linear_forward_typed(const tessel::LinearProblem& p, const py::array& q, const py::array& k,
                          const py::array& v, const py::object& state0, py::array out, py::array state_out) {
  const T* s0 = optional_data<T>(state0);
  py::gil_scoped_release release;
  tessel::linear_forward_cpu<T>(p, cdata<T>(q), cdata<T>(k), cdata<T>(v), s0, data<T>(out), data<T>(state_out));
}

void linear_forward(const py::array& q, const py::array& k, const py::array& v, const py::object& state0,
                    py::array out, py::array state_out, double scale, bool causal, int num_threads) {
  const auto p = linear_problem(q, k, v, scale, causal, num_threads);
  if (q.dtype().is(py::dtype::of<double>()))
    linear_forward_typed<double>(p, q, k, v, state0, out, state_out);
  else
    linear_forward_typed<float>(p, q, k, v, state0, out, state_out);
}

template <typename T>
void linear_backward_typed(const tessel::LinearProblem& p, const py::array& q, const py::array& k,
                           const py::array& v, const py::object& state0, const py::array& state_final,
                           const py::array& dout, const py::object& dstate, py::array dq, py::array dk, py::array dv,
                           const py::object& dstate0) {
  const T* s0 = optional_data<T>(state0);
  const T* ds = optional_data<T>(dstate);
  T* ds0 = optional_mutable<T>(dstate0);
  const Strides4 dos = strides4(dout);
  py::gil_scoped_release release;
  tessel::linear_backward_cpu<T>(p, cdata<T>(q), cdata<T>(k), cdata<T>(v), s0, cdata<T>(state_final),
                                 cdata<T>(dout), dos, ds,
                                 data<T>(dq), data<T>(dk), data<T>(dv), ds0);
}

void linear_backward(const py::array& q, const py::array& k, const py::array& v, const py::object& state0,
                     const py::array& state_final, const py::array& dout, const py::object& dstate, py::array dq,
                     py::array dk, py::array dv,
                     const py::object& dstate0, double scale, bool causal, int num_threads) {
  const auto p = linear_problem(q, k, v, scale, causal, num_threads);
  if (q.dtype().is(py::dtype::of<double>()))
    linear_backward_typed<double>(p, q, k, v, state0, state_final, dout, dstate, dq, dk, dv, dstate0);
  else
    linear_backward_typed<float>(p, q, k, v, state0, state_final, dout, dstate, dq, dk, dv, dstate0);
}

// A bucket's matrices as rows of an int64 table: grad address, error address
// (0: none), n, m, offset of pt, offset of qt.
template <typename T>
std::vector<tessel::LowRankItem<T>> lowrank_items(const py::array_t<int64_t>& table) {
  const auto t = table.unchecked<2>();
  std::vector<tessel::LowRankItem<T>> items;
  for (py::ssize_t i = 0; i < t.shape(0); ++i)
    items.push_back({reinterpret_cast<T*>(t(i, 0)), reinterpret_cast<T*>(t(i, 1)), t(i, 2), t(i, 3), t(i, 4),
                     t(i, 5)});
  return items;
}

bool is_double(const py::array& x) { return x.dtype().is(py::dtype::of<double>()); }

template <typename T>
void project_typed(const py::array_t<int64_t>& table, py::array p, py::array q, int64_t rank, bool onto_p,
                   int num_threads) {
  const auto items = lowrank_items<T>(table);
  py::gil_scoped_release release;
  if (onto_p)
    tessel::lowrank_project_p<T>(items.data(), items.size(), rank, data<T>(p), cdata<T>(q), num_threads);
  else
    tessel::lowrank_project_q<T>(items.data(), items.size(), rank, cdata<T>(p), data<T>(q), num_threads);
}

void lowrank_project(const py::array_t<int64_t>& table, py::array p, py::array q, int64_t rank, bool onto_p,
                     int num_threads) {
  if (is_double(p))
    project_typed<double>(table, p, q, rank, onto_p, num_threads);
  else
    project_typed<float>(table, p, q, rank, onto_p, num_threads);
}

template <typename T>
void reconstruct_typed(const py::array_t<int64_t>& table, const py::array& p_out, const py::array& q_out,
                       const py::array& p_err, const py::array& q_err, int64_t rank, int num_threads) {
  const auto items = lowrank_items<T>(table);
  py::gil_scoped_release release;
  tessel::lowrank_reconstruct<T>(items.data(), items.size(), rank, cdata<T>(p_out), cdata<T>(q_out), cdata<T>(p_err),
                                 cdata<T>(q_err), num_threads);
}

void lowrank_reconstruct(const py::array_t<int64_t>& table, const py::array& p_out, const py::array& q_out,
                         const py::array& p_err, const py::array& q_err, int64_t rank, int num_threads) {
  if (is_double(p_out))
    reconstruct_typed<double>(table, p_out, q_out, p_err, q_err, rank, num_threads);
  else
    reconstruct_typed<float>(table, p_out, q_out, p_err, q_err, rank, num_threads);
}

template <typename T>
void orthonormalize_typed(py::array buf, const py::array_t<int64_t>& offsets, const py::array_t<int64_t>& lengths,
                          int64_t rank, int64_t vector_stride, int64_t element_stride, double eps,
                          int num_threads) {
  py::gil_scoped_release release;
  tessel::orthonormalize<T>(data<T>(buf), offsets.data(), lengths.data(), offsets.shape(0), rank, vector_stride,
                            element_stride, eps, num_threads);
}

void orthonormalize(py::array buf, const py::array_t<int64_t>& offsets, const py::array_t<int64_t>& lengths,
                    int64_t rank, int64_t vector_stride, int64_t element_stride, double eps, int num_threads) {
  if (is_double(buf))
    orthonormalize_typed<double>(buf, offsets, lengths, rank, vector_stride, element_stride, eps, num_threads);
  else
    orthonormalize_typed<float>(buf, offsets, lengths, rank, vector_stride, element_stride, eps, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tessel CPU kernels (C++17, OpenMP, SIMD)";
  m.attr("simd_bytes") = tessel::kVecBytes;
  m.def("attention_forward", &attention_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("scale"), py::arg("band_lo"), py::arg("band_hi"), py::arg("num_threads"));
  m.def("attention_backward", &attention_backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("dout"), py::arg("lse"), py::arg("dlse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("scale"), py::arg("band_lo"), py::arg("band_hi"), py::arg("num_threads"));
  m.def("looped_forward", &looped_forward, py::arg("z"), py::arg("p"), py::arg("q"), py::arg("out"),
        py::arg("saved"), py::arg("loops"), py::arg("key_cols"), py::arg("inv_n"), py::arg("every"),
        py::arg("num_threads"));
  m.def("looped_backward", &looped_backward, py::arg("saved"), py::arg("p"), py::arg("q"), py::arg("dout"),
        py::arg("dz"), py::arg("dp"), py::arg("dq"), py::arg("loops"), py::arg("key_cols"), py::arg("inv_n"),
        py::arg("every"), py::arg("num_threads"));
  m.def("linear_forward", &linear_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("state0"),
        py::arg("out"), py::arg("state_out"), py::arg("scale"), py::arg("causal"), py::arg("num_threads"));
  m.def("linear_backward", &linear_backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("state0"),
        py::arg("state_final"), py::arg("dout"), py::arg("dstate"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("dstate0"),
        py::arg("scale"), py::arg("causal"), py::arg("num_threads"));
  m.def("lowrank_project", &lowrank_project, py::arg("table"), py::arg("p"), py::arg("q"), py::arg("rank"),
        py::arg("onto_p"), py::arg("num_threads"));
  m.def("lowrank_reconstruct", &lowrank_reconstruct, py::arg("table"), py::arg("p_out"), py::arg("q_out"),
        py::arg("p_err"), py::arg("q_err"), py::arg("rank"), py::arg("num_threads"));
  m.def("orthonormalize", &orthonormalize, py::arg("buf"), py::arg("offsets"), py::arg("lengths"), py::arg("rank"),
        py::arg("vector_stride"), py::arg("element_stride"), py::arg("eps"), py::arg("num_threads"));
}
