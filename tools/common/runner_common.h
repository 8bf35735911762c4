// What qlower's native runners (tools/llm_step_runner, tools/pte_runner) do
// alike: one-line errors `<prog>: error: ...` naming the runtime's own logged
// reason, the Vulkan backend's C++ exceptions reported the same way, and
// loading a program (with an optional .ptd) through the Module API.
//
// Call init_runner() first in main(). Exit codes: 2 for usage errors, 1 for
// everything else.
#pragma once

#include <executorch/extension/module/module.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <string>

namespace qlower_runner {

using executorch::extension::Module;
using executorch::runtime::Error;

// Set by init_runner.
inline const char* g_prog = "runner";
inline const char* g_usage = "";

// The runtime logs through the PAL. Its messages are kept (not printed) so
// that the one error line can name the runtime's own reason; the variable
// given to init_runner (e.g. LLM_STEP_RUNNER_LOG=1) shows them as they come.
inline bool g_log_passthrough = false;
inline std::string g_first_runtime_error;
inline std::string g_last_runtime_error;

inline std::string one_line(const char* s, size_t n) {
  std::string out(s, n);
  for (char& c : out) {
    if (c == '\n' || c == '\r') {
      c = ' ';
    }
  }
  while (!out.empty() && out.back() == ' ') {
    out.pop_back();
  }
  return out;
}

inline void emit_log(
    et_timestamp_t /*timestamp*/,
    et_pal_log_level_t level,
    const char* filename,
    const char* /*function*/,
    size_t line,
    const char* message,
    size_t length) {
  std::string msg = one_line(message, length);
  if (g_log_passthrough) {
    std::fprintf(
        stderr, "%c %s:%zu] %s\n", static_cast<char>(level), filename, line,
        msg.c_str());
  }
  if (level == kError || level == kFatal) {
    if (g_first_runtime_error.empty()) {
      g_first_runtime_error = msg;
    }
    g_last_runtime_error = msg;
  }
  if (level == kFatal && !g_log_passthrough) {
    // The runtime aborts right after a fatal message.
    std::fprintf(stderr, "%s: error: runtime abort: %s\n", g_prog, msg.c_str());
    std::fflush(stderr);
  }
}

inline void clear_runtime_errors() {
  g_first_runtime_error.clear();
  g_last_runtime_error.clear();
}

inline std::string runtime_reason() {
  if (g_first_runtime_error.empty()) {
    return "";
  }
  std::string r = " (runtime: " + g_first_runtime_error;
  if (g_last_runtime_error != g_first_runtime_error) {
    r += "; " + g_last_runtime_error;
  }
  return r + ")";
}

[[noreturn]] inline void fail(int code, const std::string& msg) {
  std::fflush(stdout);
  std::fprintf(stderr, "%s: error: %s\n", g_prog, msg.c_str());
  std::fflush(stderr);
  std::exit(code);
}

[[noreturn]] inline void usage_error(const std::string& msg) {
  fail(2, msg + " (" + g_usage + ")");
}

[[noreturn]] inline void runtime_error(const std::string& what, Error err) {
  fail(
      1,
      what + ": " + executorch::runtime::to_string(err) + runtime_reason());
}

// The Vulkan backend reports failures as C++ exceptions. The runtime between
// it and the runner is built without unwind tables, so such an exception ends
// in std::terminate; say what it was in one line instead of libstdc++'s two.
[[noreturn]] inline void on_terminate() {
  std::string what = "unknown exception";
  if (std::exception_ptr p = std::current_exception()) {
    try {
      std::rethrow_exception(p);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
  } else {
    what = "std::terminate without an exception";
  }
  std::fflush(stdout);
  std::fprintf(
      stderr, "%s: error: the runtime threw: %s\n", g_prog,
      one_line(what.data(), what.size()).c_str());
  std::fflush(stderr);
  std::_Exit(1);
}

// Error reporting and the runtime's log first; then runtime_init.
inline void init_runner(const char* prog, const char* usage,
                        const char* log_env) {
  g_prog = prog;
  g_usage = usage;
  std::set_terminate(on_terminate);
  const char* env_log = std::getenv(log_env);
  g_log_passthrough = env_log != nullptr && std::strcmp(env_log, "0") != 0 &&
      env_log[0] != '\0';
  executorch::runtime::register_pal(
      executorch::runtime::PalImpl::create(emit_log, __FILE__));
  executorch::runtime::runtime_init();
}

inline bool file_readable(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return f.good();
}

// The program at `model` (weights from `data` when not empty), loaded; the
// flags name the options in the error lines.
inline std::unique_ptr<Module> load_program(
    const std::string& model,
    const std::string& data,
    const char* model_flag,
    const char* data_flag) {
  if (!file_readable(model)) {
    fail(1, std::string("cannot read ") + model_flag + " " + model);
  }
  if (!data.empty() && !file_readable(data)) {
    fail(1, std::string("cannot read ") + data_flag + " " + data);
  }
  std::unique_ptr<Module> m;
  if (data.empty()) {
    m = std::make_unique<Module>(
        model, Module::LoadMode::MmapUseMlockIgnoreErrors);
  } else {
    m = std::make_unique<Module>(
        model, data, Module::LoadMode::MmapUseMlockIgnoreErrors);
  }
  clear_runtime_errors();
  Error err = m->load();
  if (err != Error::Ok) {
    runtime_error("loading program " + model, err);
  }
  return m;
}

}  // namespace qlower_runner
