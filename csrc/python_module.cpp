// Python module sar_fast._C. Importing it loads the library, which registers the
// sar_fast::* operators with the dispatcher (call them as torch.ops.sar_fast.*).
#include <torch/extension.h>

#include "msq.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sar_fast C++/CUDA operators; use them through torch.ops.sar_fast";
  m.def("cuda_compiled", &sar_fast::cuda_compiled,
        "True when the CUDA kernels were compiled into this build");
  m.def("cpu_isas", &sar_fast::cpu_isas,
        "Instruction-set variants of the CPU quantisation kernels this CPU supports, best first");
  m.def("cpu_isa", &sar_fast::cpu_isa, "The CPU kernel variant in use");
  m.def("set_cpu_isa", &sar_fast::set_cpu_isa, pybind11::arg("name"),
        "Use another supported CPU kernel variant (all give identical results)");
}
