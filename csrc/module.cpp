// The Python module jakiro._C. Importing it loads the op registrations of this
// library (TORCH_LIBRARY blocks run at load time); the module itself only
// reports how it was built.
#include <pybind11/pybind11.h>

#include "jakiro/tree.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "jakiro C++/CUDA kernels (ops are under torch.ops.jakiro)";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["cuda_compiled"] = static_cast<bool>(JAKIRO_WITH_CUDA);
        info["cuda_arch_list"] = JAKIRO_CUDA_ARCH_LIST;
        info["nvcc_version"] = JAKIRO_NVCC_VERSION;
        info["built_against_torch"] = JAKIRO_BUILT_AGAINST_TORCH;
        info["build_type"] = JAKIRO_BUILD_TYPE;
        info["cxx_compiler"] = JAKIRO_CXX_COMPILER;
        info["max_tree_nodes"] = jakiro::kMaxTreeNodes;
        return info;
      },
      "How this extension was built: CUDA kernels compiled or not, arch list, versions.");
}
