// The op schemas (TORCH_LIBRARY) and the Python module lora_fused._C.
//
// Importing lora_fused._C loads this library, whose static initialisers register the
// schemas here and the CPU / CUDA kernels in cpu_ops.cpp / cuda_ops.cpp. Fake functions
// and autograd are registered from Python (lora_fused/ops.py). The module constant
// `built_with_cuda` records whether setup.py compiled the CUDA kernels in, so a test can
// tell a silently CPU-only build from a real one; `built_with_sm90a` whether they include
// the Hopper (sm_90a) TMA + wgmma kernel.
#include <Python.h>
#include <torch/library.h>

#ifndef LORA_FUSED_WITH_CUDA
#define LORA_FUSED_WITH_CUDA 0
#endif
#ifndef LORA_FUSED_SM90A
#define LORA_FUSED_SM90A 0
#endif

TORCH_LIBRARY(lora_fused, m) {
  m.def(
      "fused_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  m.def(
      "fused_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
      "float scaling, float dropout_p, Tensor seed, bool compute_dx, bool compute_db) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}

static PyModuleDef lora_fused_module = {
    PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of lora_fused (registers torch.ops.lora_fused.fused_*).", -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&lora_fused_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "built_with_cuda", LORA_FUSED_WITH_CUDA) != 0 ||
      PyModule_AddIntConstant(module, "built_with_sm90a", LORA_FUSED_SM90A) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
