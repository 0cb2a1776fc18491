# Torch discovery for the jakiro extension. Defines the target jakiro::torch.
#
# Inputs (set by setup.py): JAKIRO_WITH_CUDA, JAKIRO_TORCH_DIR (the torch package
# folder), JAKIRO_TORCH_HAS_CUDA (torch itself was built with CUDA),
# JAKIRO_NVIDIA_PIP_DIR (site-packages/nvidia/cu13 when present),
# JAKIRO_CUDA_ARCH_LIST (TORCH_CUDA_ARCH_LIST syntax, e.g. "8.0;9.0"),
# JAKIRO_CXX11_ABI (0 or 1, as torch was built).

if(NOT JAKIRO_TORCH_DIR)
  message(FATAL_ERROR "JAKIRO_TORCH_DIR is not set: build through setup.py (pip install .)")
endif()
list(APPEND CMAKE_PREFIX_PATH "${JAKIRO_TORCH_DIR}/share/cmake")

if(JAKIRO_WITH_CUDA)
  # torch's own CMake code turns TORCH_CUDA_ARCH_LIST into -gencode flags.
  set(ENV{TORCH_CUDA_ARCH_LIST} "${JAKIRO_CUDA_ARCH_LIST}")
  if(JAKIRO_NVIDIA_PIP_DIR AND EXISTS "${JAKIRO_NVIDIA_PIP_DIR}/include")
    # A pip torch keeps the CUDA libraries and the extra headers (cusparse.h,
    # cublas_v2.h, ...) in site-packages/nvidia/cu13; a bare nvcc install may
    # lack them. Point torch's CUDA discovery at both places.
    if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR)
      get_filename_component(_nvcc_bin "${CMAKE_CUDA_COMPILER}" DIRECTORY)
      get_filename_component(CUDA_TOOLKIT_ROOT_DIR "${_nvcc_bin}" DIRECTORY)
    endif()
    set(CUDA_INCLUDE_DIRS "${JAKIRO_NVIDIA_PIP_DIR}/include;${CUDA_TOOLKIT_ROOT_DIR}/include")
    foreach(_libdir lib64 lib)
      if(NOT CUDA_CUDART_LIBRARY AND EXISTS "${CUDA_TOOLKIT_ROOT_DIR}/${_libdir}/libcudart.so")
        set(CUDA_CUDART_LIBRARY "${CUDA_TOOLKIT_ROOT_DIR}/${_libdir}/libcudart.so")
      endif()
    endforeach()
    if(NOT CUDA_CUDART_LIBRARY AND EXISTS "${JAKIRO_NVIDIA_PIP_DIR}/lib/libcudart.so.13")
      set(CUDA_CUDART_LIBRARY "${JAKIRO_NVIDIA_PIP_DIR}/lib/libcudart.so.13")
    endif()
    file(GLOB _nvrtc "${JAKIRO_NVIDIA_PIP_DIR}/lib/libnvrtc.so.*")
    if(_nvrtc AND NOT CUDA_nvrtc_LIBRARY)
      list(GET _nvrtc 0 CUDA_nvrtc_LIBRARY)
    endif()
  endif()
  find_package(Torch REQUIRED CONFIG)
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD ${JAKIRO_CXX_STANDARD})
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  if(JAKIRO_NVIDIA_PIP_DIR AND EXISTS "${JAKIRO_NVIDIA_PIP_DIR}/include")
    include_directories(SYSTEM "${JAKIRO_NVIDIA_PIP_DIR}/include")
  endif()
  add_library(jakiro::torch INTERFACE IMPORTED)
  target_link_libraries(jakiro::torch INTERFACE ${TORCH_LIBRARIES})
  target_include_directories(jakiro::torch INTERFACE ${TORCH_INCLUDE_DIRS})
elseif(NOT JAKIRO_TORCH_HAS_CUDA)
  find_package(Torch REQUIRED CONFIG)
  add_library(jakiro::torch INTERFACE IMPORTED)
  target_link_libraries(jakiro::torch INTERFACE ${TORCH_LIBRARIES})
  target_include_directories(jakiro::torch INTERFACE ${TORCH_INCLUDE_DIRS})
else()
  # A CUDA build of torch, but a CPU-only extension: torch's CMake config would
  # insist on finding a CUDA toolkit, which this machine may not have. The CPU
  # kernels need only libtorch_cpu and libc10, so link those directly.
  add_library(jakiro::torch INTERFACE IMPORTED)
  target_include_directories(jakiro::torch INTERFACE
    "${JAKIRO_TORCH_DIR}/include" "${JAKIRO_TORCH_DIR}/include/torch/csrc/api/include")
  target_link_directories(jakiro::torch INTERFACE "${JAKIRO_TORCH_DIR}/lib")
  target_link_libraries(jakiro::torch INTERFACE torch torch_cpu c10)
  target_compile_definitions(jakiro::torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${JAKIRO_CXX11_ABI})
endif()
