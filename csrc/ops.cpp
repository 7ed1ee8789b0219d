// The one place where the extension's op schemas live. Implementations register per dispatch key:
// augment_cpu.cpp (CPU, OpenMP) and augment_cuda.cu (CUDA). Both ops write into a caller-allocated
// tensor; the functional, torch.compile-facing ops are diffaug_fast::pre / post in
// diffaug_fast/ops/fused.py, which call these.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(diffaug_fast_ext, m) {
  // x: [B, C, H, W] view (uint8 pixels, or float in [-1, 1], or classifier-normalized when mean/std given);
  // noise: float32 like x, or philox: int64 [2] (seed, offset). Writes x_t (float32/16/bf16, any strides).
  m.def("pre(Tensor x, Tensor t, Tensor table, Tensor? noise, Tensor? philox, float[]? mean, float[]? std, "
        "Tensor(a!) x_t) -> ()");
  // model_out: [B, C or 2C, H, W] (eps = first C channels, read in place); writes x0 (normalized with
  // mean/std when given) into out (any float dtype and strides, e.g. a slice of a larger batch).
  m.def("post(Tensor model_out, Tensor x_t, Tensor t, Tensor table, float[]? mean, float[]? std, bool clip, "
        "Tensor(a!) out) -> ()");
  // float32 N(0, 1) draw of each int64 element index in idx, computed one element at a time by
  // augment_math.h's philox_normal (the function the GPU kernel calls): lets CPU tests check the GPU's
  // noise against the Python specification and the CPU kernel's blockwise generator.
  m.def("philox_normal_elementwise(Tensor idx, int seed) -> Tensor");
  // silu(group_norm(x) * (1 + scale) + shift) for float32 [B, C, H, W] (NCHW or channels_last), scale and
  // shift float32 [B, C] or both None; see group_norm_cpu.cpp (CPU only: on GPU torch.compile fuses it).
  m.def("group_norm_silu(Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, int groups, "
        "float eps) -> Tensor");
}

// `import diffaug_fast._C` loads this library, which runs the registrations above.
static struct PyModuleDef diffaug_module = {PyModuleDef_HEAD_INIT, "_C", "diffaug-fast fused ops", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&diffaug_module); }
