# Helpers for linking a pybind11 module against the installed torch.
# Torch's CMake config does not export libtorch_python, which holds the pybind11 casters for
# at::Tensor; without it the module fails to import (undefined type_caster<at::Tensor>::load).
function(spotserve_link_torch target)
  find_library(TORCH_PYTHON_LIBRARY torch_python PATHS "${TORCH_INSTALL_PREFIX}/lib" REQUIRED NO_DEFAULT_PATH)
  target_link_libraries(${target} PRIVATE ${TORCH_LIBRARIES} ${TORCH_PYTHON_LIBRARY})
  target_compile_definitions(${target} PRIVATE TORCH_EXTENSION_NAME=_C)
  # Torch builds with the pre-C++11 ABI on some wheels; follow whatever it reports.
  target_compile_options(${target} PRIVATE ${TORCH_CXX_FLAGS_LIST})
  set_target_properties(${target} PROPERTIES CXX_VISIBILITY_PRESET hidden)
endfunction()
