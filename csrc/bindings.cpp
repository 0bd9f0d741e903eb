// torch bindings of the CUDA kernels: the ops torch.ops.espo.sample and torch.ops.espo.sample_stop.
//
// The kernels (sample.cu) know nothing of torch; this file checks tensors, allocates the outputs and the
// workspace with torch's caching allocator, and launches on torch's current stream, so the ops work
// under CUDA graph capture. Meta implementations give torch.compile the output shapes. The stop-state
// tensors that sample_stop updates in place are declared mutable (Tensor(a!) ...) in its schema.
//
// Per-row arguments come as an optional [B] tensor plus a scalar used when the tensor is None, so that a
// Python number costs no device tensor. espo.sample validates values; here only what would otherwise be
// an illegal memory access is checked (devices, dtypes, shapes, contiguity).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <optional>
#include <tuple>
#include <vector>

#include "sample.cuh"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Outputs7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Outputs8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

void check_logits(const Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "espo::sample: logits must have shape [B, V], got rank ", logits.dim());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "espo::sample: logits must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(logits.size(1) >= 1, "espo::sample: logits has an empty vocabulary (V == 0)");
}

// The [B] tensor of a per-row argument on the logits' device (made contiguous if needed; the copy is kept
// alive in `keep` until the launch is enqueued, which is all the stream-ordered allocator needs).
template <typename T>
espo::RowArg<T> row_arg(const OptTensor& t, T value, const char* name, const Tensor& logits, at::ScalarType dtype,
                        std::vector<Tensor>& keep) {
  if (!t.has_value()) return {nullptr, value};
  const Tensor& x = *t;
  const int64_t B = logits.size(0);
  TORCH_CHECK(x.device() == logits.device(), "espo::sample: ", name, " must be on ", logits.device(), ", got ",
              x.device());
  TORCH_CHECK(x.scalar_type() == dtype, "espo::sample: ", name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == B, "espo::sample: ", name, " must have shape (", B, ",), got ", x.sizes());
  keep.push_back(x.contiguous());
  return {keep.back().data_ptr<T>(), value};
}

Tensor new_row(const Tensor& logits, at::ScalarType dtype) {
  return at::empty({logits.size(0)}, logits.options().dtype(dtype));
}

struct StopArgs {
  Tensor z, sum_g, sum_g2, count, position, stopped, scalars;
  OptTensor rows, values;
  double alpha_s, clip, delta, value_floor;
  int64_t min_tokens;
};

void check_state(const Tensor& t, const char* name, at::ScalarType dtype, int64_t n, const Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), "espo::sample_stop: stopper.", name, " must be on ", logits.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "espo::sample_stop: stopper.", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), "espo::sample_stop: stopper.", name,
              " must be a contiguous tensor of shape (", n, ",), got ", t.sizes());
}

Outputs8 run(const Tensor& logits_in, const OptTensor& temperature, double temperature_value, const OptTensor& top_k,
             int64_t top_k_value, const OptTensor& top_p, double top_p_value, const OptTensor& seed, int64_t seed_value,
             const OptTensor& offset, int64_t offset_value, const StopArgs* stop) {
  check_logits(logits_in);
  TORCH_CHECK(logits_in.is_cuda(), "espo::sample: the cuda backend needs CUDA tensors, got ", logits_in.device());
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);

  std::vector<Tensor> keep;
  espo::SampleArgs args;
  args.logits = logits.data_ptr();
  args.dtype = logits.scalar_type() == at::kFloat      ? espo::LogitsType::kFloat32
               : logits.scalar_type() == at::kBFloat16 ? espo::LogitsType::kBFloat16
                                                       : espo::LogitsType::kFloat16;
  args.batch = B;
  args.vocab = V;
  args.row_stride = B > 1 ? logits.stride(0) : V;
  args.temperature = row_arg<float>(temperature, static_cast<float>(temperature_value), "temperature", logits, at::kFloat, keep);
  args.top_k = row_arg<int64_t>(top_k, top_k_value, "top_k", logits, at::kLong, keep);
  args.top_p = row_arg<float>(top_p, static_cast<float>(top_p_value), "top_p", logits, at::kFloat, keep);
  args.seed = row_arg<int64_t>(seed, seed_value, "seed", logits, at::kLong, keep);
  args.offset = row_arg<int64_t>(offset, offset_value, "offset", logits, at::kLong, keep);

  Tensor tokens = new_row(logits, at::kLong);
  Tensor logprobs = new_row(logits, at::kFloat);
  Tensor raw_logprobs = new_row(logits, at::kFloat);
  Tensor entropy = new_row(logits, at::kFloat);
  Tensor max_logprob = new_row(logits, at::kFloat);
  Tensor regret = new_row(logits, at::kFloat);
  Tensor valid = new_row(logits, at::kBool);
  Tensor stop_mask = stop != nullptr ? new_row(logits, at::kBool) : Tensor();

  espo::StopState state{};
  if (stop != nullptr) {
    const int64_t n = stop->z.numel();
    TORCH_CHECK(stop->rows.has_value() || n == B, "espo::sample_stop: the stopper holds ", n,
                " rows but logits have ", B, "; pass stopper_rows");
    check_state(stop->z, "z", at::kFloat, n, logits);
    check_state(stop->sum_g, "sum_g", at::kFloat, n, logits);
    check_state(stop->sum_g2, "sum_g2", at::kFloat, n, logits);
    check_state(stop->count, "count", at::kInt, n, logits);
    check_state(stop->position, "position", at::kInt, n, logits);
    check_state(stop->stopped, "stopped", at::kBool, n, logits);
    check_state(stop->scalars, "scalars", at::kFloat, 5, logits);
    state.z = stop->z.data_ptr<float>();
    state.sum_g = stop->sum_g.data_ptr<float>();
    state.sum_g2 = stop->sum_g2.data_ptr<float>();
    state.count = stop->count.data_ptr<int32_t>();
    state.position = stop->position.data_ptr<int32_t>();
    state.stopped = stop->stopped.data_ptr<bool>();
    state.scalars = stop->scalars.data_ptr<float>();
    state.num_rows = n;
    state.rows = row_arg<int64_t>(stop->rows, 0, "stopper_rows", logits, at::kLong, keep).ptr;
    state.values = row_arg<float>(stop->values, 0.0f, "values", logits, at::kFloat, keep).ptr;
    state.stop = stop_mask.data_ptr<bool>();
    state.alpha_s = static_cast<float>(stop->alpha_s);
    state.one_minus_alpha_s = static_cast<float>(1.0 - stop->alpha_s);
    state.clip = static_cast<float>(stop->clip);
    state.delta = static_cast<float>(stop->delta);
    state.value_floor = static_cast<float>(stop->value_floor);
    state.min_tokens = stop->min_tokens;
  }

  if (B > 0) {
    espo::SampleOutputs out{tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(), raw_logprobs.data_ptr<float>(),
                            entropy.data_ptr<float>(), max_logprob.data_ptr<float>(), regret.data_ptr<float>(),
                            valid.data_ptr<bool>()};
    const size_t bytes = espo::sample_workspace_bytes(args);
    Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, logits.options().dtype(at::kByte));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
    const int err = espo::sample_launch(args, out, stop != nullptr ? &state : nullptr, workspace.data_ptr(), bytes, stream);
    TORCH_CHECK(err == 0, "espo::sample: the CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)),
                " (B=", B, ", V=", V, ")");
  }
  return {tokens, logprobs, raw_logprobs, entropy, max_logprob, regret, valid, stop_mask};
}

Outputs7 sample_cuda(const Tensor& logits, const OptTensor& temperature, double temperature_value, const OptTensor& top_k,
                     int64_t top_k_value, const OptTensor& top_p, double top_p_value, const OptTensor& seed,
                     int64_t seed_value, const OptTensor& offset, int64_t offset_value) {
  auto o = run(logits, temperature, temperature_value, top_k, top_k_value, top_p, top_p_value, seed, seed_value, offset,
               offset_value, nullptr);
  return {std::get<0>(o), std::get<1>(o), std::get<2>(o), std::get<3>(o), std::get<4>(o), std::get<5>(o), std::get<6>(o)};
}

Outputs8 sample_stop_cuda(const Tensor& logits, const OptTensor& temperature, double temperature_value,
                          const OptTensor& top_k, int64_t top_k_value, const OptTensor& top_p, double top_p_value,
                          const OptTensor& seed, int64_t seed_value, const OptTensor& offset, int64_t offset_value,
                          Tensor& z, Tensor& sum_g, Tensor& sum_g2, Tensor& count, Tensor& position, Tensor& stopped,
                          const Tensor& scalars, const OptTensor& stopper_rows, const OptTensor& values, double alpha_s,
                          double clip, double delta, double value_floor, int64_t min_tokens) {
  const StopArgs stop{z, sum_g, sum_g2, count, position, stopped, scalars, stopper_rows, values,
                      alpha_s, clip, delta, value_floor, min_tokens};
  return run(logits, temperature, temperature_value, top_k, top_k_value, top_p, top_p_value, seed, seed_value, offset,
             offset_value, &stop);
}

// ---------------------------------------------------------------- shapes only (torch.compile, meta tensors)

Outputs8 meta_outputs(const Tensor& logits, bool with_stop) {
  check_logits(logits);
  return {new_row(logits, at::kLong),  new_row(logits, at::kFloat), new_row(logits, at::kFloat),
          new_row(logits, at::kFloat), new_row(logits, at::kFloat), new_row(logits, at::kFloat),
          new_row(logits, at::kBool),  with_stop ? new_row(logits, at::kBool) : Tensor()};
}

Outputs7 sample_meta(const Tensor& logits, const OptTensor&, double, const OptTensor&, int64_t, const OptTensor&, double,
                     const OptTensor&, int64_t, const OptTensor&, int64_t) {
  auto o = meta_outputs(logits, false);
  return {std::get<0>(o), std::get<1>(o), std::get<2>(o), std::get<3>(o), std::get<4>(o), std::get<5>(o), std::get<6>(o)};
}

Outputs8 sample_stop_meta(const Tensor& logits, const OptTensor&, double, const OptTensor&, int64_t, const OptTensor&,
                          double, const OptTensor&, int64_t, const OptTensor&, int64_t, Tensor&, Tensor&, Tensor&,
                          Tensor&, Tensor&, Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double, double,
                          double, double, int64_t) {
  return meta_outputs(logits, true);
}

}  // namespace

#define ESPO_ROW_ARGS                                                                                        \
  "Tensor logits, Tensor? temperature, float temperature_value, Tensor? top_k, int top_k_value, Tensor? top_p, " \
  "float top_p_value, Tensor? seed, int seed_value, Tensor? offset, int offset_value"
#define ESPO_OUTPUTS \
  "Tensor tokens, Tensor logprobs, Tensor raw_logprobs, Tensor entropy, Tensor max_logprob, Tensor regret, Tensor valid"

TORCH_LIBRARY(espo, m) {
  m.def("sample(" ESPO_ROW_ARGS ") -> (" ESPO_OUTPUTS ")");
  m.def("sample_stop(" ESPO_ROW_ARGS
        ", Tensor(a!) z, Tensor(b!) sum_g, Tensor(c!) sum_g2, Tensor(d!) count, Tensor(e!) position, "
        "Tensor(f!) stopped, Tensor scalars, Tensor? stopper_rows, Tensor? values, float alpha_s, float clip, "
        "float delta, float value_floor, int min_tokens) -> (" ESPO_OUTPUTS ", Tensor stop)");
}

TORCH_LIBRARY_IMPL(espo, CUDA, m) {
  m.impl("sample", &sample_cuda);
  m.impl("sample_stop", &sample_stop_cuda);
}

TORCH_LIBRARY_IMPL(espo, Meta, m) {
  m.impl("sample", &sample_meta);
  m.impl("sample_stop", &sample_stop_meta);
}

// `import espo._C` loads this library, whose static initialisers above register the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "espo's compiled CUDA kernels; the ops live under torch.ops.espo", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
