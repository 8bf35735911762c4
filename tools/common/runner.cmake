# What qlower's native runners (llm_step_runner, pte_runner) build against,
# included by each runner's CMakeLists.txt and by tools/CMakeLists.txt (both
# runners in one tree, the op library built once):
#
# - EXECUTORCH_INSTALL_DIR: install prefix of an ExecuTorch built with the
#   Vulkan backend and the module / tensor / data-loader / flat-tensor /
#   named-data-map extensions (required);
# - QLOWER_VK_OPS (OFF): also build qlower's ET-VK operator library (runtime/,
#   needs the unpacked ET-VK SDK: QLOWER_ET_VK_SDK, by default the parent of
#   EXECUTORCH_INSTALL_DIR) and link it into every runner;
# - qlower_runner_link(<target>): links a runner with all of it.
include_guard(GLOBAL)

if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
  set(CMAKE_BUILD_TYPE
      Release
      CACHE STRING "Build type" FORCE
  )
endif()

set(EXECUTORCH_INSTALL_DIR
    ""
    CACHE PATH "Install prefix of an ExecuTorch build with the Vulkan backend"
)
if(NOT EXECUTORCH_INSTALL_DIR)
  message(FATAL_ERROR "Set -DEXECUTORCH_INSTALL_DIR=<ExecuTorch install prefix>")
endif()

option(QLOWER_VK_OPS "Link qlower's ET-VK operator library (runtime/)" OFF)

set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)

find_package(
  executorch CONFIG REQUIRED PATHS "${EXECUTORCH_INSTALL_DIR}"
  NO_DEFAULT_PATH
)

foreach(
  _t
  vulkan_backend
  extension_module_static
  extension_tensor
  extension_data_loader
  extension_flat_tensor
  portable_ops_lib
)
  if(NOT TARGET ${_t})
    message(
      FATAL_ERROR
        "ExecuTorch at ${EXECUTORCH_INSTALL_DIR} has no ${_t}: build it with "
        "EXECUTORCH_BUILD_VULKAN and the module, tensor, data-loader and "
        "flat-tensor extensions ON"
    )
  endif()
endforeach()

if(QLOWER_VK_OPS)
  add_subdirectory(
    "${CMAKE_CURRENT_LIST_DIR}/../../runtime" "${CMAKE_BINARY_DIR}/qlower_vk_ops"
  )
endif()

function(qlower_runner_link target)
  # tools/ holds common/runner_common.h.
  target_include_directories(${target} PRIVATE "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/..")
  # ExecuTorch's headers compile without exceptions; the runners keep them on
  # only to report the Vulkan backend's C++ exceptions (on_terminate in
  # common/runner_common.h).
  target_link_libraries(
    ${target}
    PRIVATE executorch
            extension_module_static
            extension_tensor
            extension_data_loader
            extension_flat_tensor
            # Registered by static constructors: both are linked whole-archive
            # through their exported link options.
            vulkan_backend
            portable_ops_lib
  )
  if(QLOWER_VK_OPS)
    # qlower_vk_ops and qlower_vk_shaders carry whole-archive link options.
    target_link_libraries(${target} PRIVATE qlower_vk_ops)
  endif()
  if(TARGET extension_named_data_map)
    target_link_libraries(${target} PRIVATE extension_named_data_map)
  endif()
  # Self-contained binary: only libc (and libm/libdl) remain dynamic; the Vulkan
  # loader is opened at run time by volk.
  target_link_options(
    ${target} PRIVATE -static-libstdc++ -static-libgcc "LINKER:--gc-sections"
  )
  install(TARGETS ${target} RUNTIME DESTINATION bin)
endfunction()
