// pte_runner: run one method of an ExecuTorch `.pte` once through the Module
// API (Vulkan backend, portable CPU kernels; qlower's ET-VK ops when built
// with QLOWER_VK_OPS), inputs from raw files, outputs to raw files. The
// command line is the one of ExecuTorch's executor_runner as qlower's tests
// use it:
//
//   pte_runner --model_path PATH.pte [--data_path PATH.ptd]
//              --inputs a.bin,b.bin [--output_file PREFIX]
//              [--print_output none|summary|all] [--method NAME]
//              [--num_executions N]
//
// Inputs: one file per input of the method, in order, each the tensor's raw
// little-endian bytes in the method's declared dtype and shape (contiguous,
// in the declared dim order); count and size are checked against the method's
// meta before anything runs. Outputs: every tensor output i is written to
// PREFIX-<i>.bin, its raw bytes. --print_output (default summary) prints each
// output's dtype and shape, then its first and last values (summary) or all of
// them (all); none prints nothing. --method defaults to forward
// (--method_name is the same option).
// Errors: one line `pte_runner: error: ...` on stderr (the runtime's own
// logged reason appended); exit 2 for usage errors, 1 for everything else.
// PTE_RUNNER_LOG=1 shows the runtime's log as it comes.

#include "common/runner_common.h"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/core/exec_aten/util/scalar_type_util.h>
#include <executorch/runtime/core/tag.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::extension::for_blob;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::MethodMeta;
using executorch::runtime::Tag;
using qlower_runner::clear_runtime_errors;
using qlower_runner::fail;
using qlower_runner::init_runner;
using qlower_runner::load_program;
using qlower_runner::runtime_error;
using qlower_runner::usage_error;

namespace {

const char* kUsage =
    "usage: pte_runner --model_path PATH.pte [--data_path PATH.ptd] "
    "--inputs a.bin,b.bin [--output_file PREFIX] "
    "[--print_output none|summary|all] [--method NAME] [--num_executions N]";

enum class Print { None, Summary, All };

struct Args {
  std::string model;
  std::string data;
  std::vector<std::string> inputs;
  bool has_inputs = false;
  std::string output_prefix;
  Print print = Print::Summary;
  std::string method = "forward";
  int64_t executions = 1;
};

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    size_t comma = s.find(',', start);
    out.push_back(s.substr(
        start, comma == std::string::npos ? std::string::npos : comma - start));
    if (comma == std::string::npos) {
      return out;
    }
    start = comma + 1;
  }
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    std::string value;
    size_t eq = flag.find('=');
    if (flag == "-h" || flag == "--help") {
      std::printf("%s\n", kUsage);
      std::exit(0);
    }
    if (flag.rfind("--", 0) != 0) {
      usage_error("unexpected argument '" + flag + "'");
    }
    if (eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
    } else {
      if (i + 1 >= argc) {
        usage_error(flag + " needs a value");
      }
      value = argv[++i];
    }
    if (flag == "--model_path") {
      a.model = value;
    } else if (flag == "--data_path") {
      a.data = value;
    } else if (flag == "--inputs") {
      a.has_inputs = true;
      a.inputs = value.empty() ? std::vector<std::string>{}
                               : split_commas(value);
      for (const std::string& f : a.inputs) {
        if (f.empty()) {
          usage_error("--inputs has an empty file name (got '" + value + "')");
        }
      }
    } else if (flag == "--output_file") {
      a.output_prefix = value;
    } else if (flag == "--print_output") {
      if (value == "none") {
        a.print = Print::None;
      } else if (value == "summary") {
        a.print = Print::Summary;
      } else if (value == "all") {
        a.print = Print::All;
      } else {
        usage_error("--print_output takes none, summary or all (got '" +
                    value + "')");
      }
    } else if (flag == "--method" || flag == "--method_name") {
      if (value.empty()) {
        usage_error(flag + " needs a method name");
      }
      a.method = value;
    } else if (flag == "--num_executions") {
      char* end = nullptr;
      long long n = std::strtoll(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || n < 1 || n > 1000000) {
        usage_error("--num_executions takes a positive integer (got '" +
                    value + "')");
      }
      a.executions = n;
    } else {
      usage_error("unknown option " + flag);
    }
  }
  if (a.model.empty()) {
    usage_error("--model_path is required");
  }
  return a;
}

std::string tag_name(Tag tag) {
  char buf[32];
  executorch::runtime::tag_to_string(tag, buf, sizeof(buf));
  return buf;
}

std::string shape_str(const std::vector<int32_t>& sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return s + "]";
}

std::string dtype_name(ScalarType t) {
  return executorch::runtime::toString(t);
}

// One input's bytes and the tensor over them (the bytes outlive the tensor).
struct Input {
  std::vector<char> bytes;
  TensorPtr tensor;
};

std::vector<char> read_file(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) {
    fail(1, "cannot read " + what + " " + path);
  }
  std::streamsize n = f.tellg();
  f.seekg(0, std::ios::beg);
  std::vector<char> bytes(n > 0 ? static_cast<size_t>(n) : 0);
  if (n < 0 || (n > 0 && !f.read(bytes.data(), n))) {
    fail(1, "cannot read " + what + " " + path);
  }
  return bytes;
}

// The input files as tensors of the method's declared inputs; count, dtype
// (by size) and shape checked first.
std::vector<Input> load_inputs(const Args& a, const MethodMeta& meta) {
  const size_t n = meta.num_inputs();
  const std::string m = a.method;
  if (!a.has_inputs && n > 0) {
    fail(2, m + " takes " + std::to_string(n) +
                " input(s); give them with --inputs a.bin,b.bin (" + kUsage +
                ")");
  }
  if (a.inputs.size() != n) {
    fail(1, "--inputs names " + std::to_string(a.inputs.size()) +
                " file(s); " + m + " takes " + std::to_string(n) +
                " input(s)");
  }
  std::vector<Input> inputs(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string which = m + " input " + std::to_string(i);
    auto tag = meta.input_tag(i);
    if (!tag.ok()) {
      runtime_error("reading the meta of " + which, tag.error());
    }
    if (*tag != Tag::Tensor) {
      fail(1, which + " is a " + tag_name(*tag) +
                  "; pte_runner feeds tensor inputs only");
    }
    auto info = meta.input_tensor_meta(i);
    if (!info.ok()) {
      runtime_error("reading the meta of " + which, info.error());
    }
    std::vector<int32_t> sizes(info->sizes().begin(), info->sizes().end());
    std::vector<uint8_t> dim_order(info->dim_order().begin(),
                                   info->dim_order().end());
    const ScalarType dtype = info->scalar_type();
    size_t numel = 1;
    for (int32_t s : sizes) {
      numel *= static_cast<size_t>(s);
    }
    const size_t want = numel * executorch::runtime::elementSize(dtype);
    Input& in = inputs[i];
    in.bytes = read_file(a.inputs[i], "input file");
    if (in.bytes.size() != want) {
      fail(1, "input file " + a.inputs[i] + " has " +
                  std::to_string(in.bytes.size()) + " bytes; " + which +
                  " is " + dtype_name(dtype) + " " + shape_str(sizes) + " (" +
                  std::to_string(want) + " bytes)");
    }
    // A zero-size file still needs a valid pointer.
    if (in.bytes.empty()) {
      in.bytes.resize(1);
    }
    in.tensor = for_blob(in.bytes.data(), sizes, dtype)
                    .dim_order(dim_order)
                    .make_tensor_ptr();
  }
  return inputs;
}

void print_value(const Tensor& t, ssize_t j) {
  switch (t.scalar_type()) {
    case ScalarType::Float:
      std::printf("%g", t.const_data_ptr<float>()[j]);
      break;
    case ScalarType::Double:
      std::printf("%g", t.const_data_ptr<double>()[j]);
      break;
    case ScalarType::Half:
      std::printf(
          "%g", static_cast<float>(t.const_data_ptr<executorch::aten::Half>()[j]));
      break;
    case ScalarType::BFloat16:
      std::printf("%g", static_cast<float>(
                            t.const_data_ptr<executorch::aten::BFloat16>()[j]));
      break;
    case ScalarType::Long:
      std::printf("%" PRId64, t.const_data_ptr<int64_t>()[j]);
      break;
    case ScalarType::Int:
      std::printf("%" PRId32, t.const_data_ptr<int32_t>()[j]);
      break;
    case ScalarType::Short:
      std::printf("%d", t.const_data_ptr<int16_t>()[j]);
      break;
    case ScalarType::Char:
      std::printf("%d", t.const_data_ptr<int8_t>()[j]);
      break;
    case ScalarType::Byte:
      std::printf("%u", t.const_data_ptr<uint8_t>()[j]);
      break;
    case ScalarType::Bool:
      std::printf("%d", t.const_data_ptr<bool>()[j] ? 1 : 0);
      break;
    default:
      std::printf("?");
  }
}

// One line per output: `Output i: dtype [shape]`, then its values (all, or
// the first and last 100), one per line.
void print_outputs(const std::vector<EValue>& outputs, Print mode) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    const EValue& v = outputs[i];
    if (!v.isTensor()) {
      std::printf("Output %zu: %s\n", i, tag_name(v.tag).c_str());
      continue;
    }
    const Tensor& t = v.toTensor();
    std::vector<int32_t> sizes(t.sizes().begin(), t.sizes().end());
    std::printf("Output %zu: %s %s\n", i, dtype_name(t.scalar_type()).c_str(),
                shape_str(sizes).c_str());
    const ssize_t n = t.numel();
    const ssize_t edge = 100;
    for (ssize_t j = 0; j < n; ++j) {
      if (mode == Print::Summary && n > 2 * edge && j == edge) {
        std::printf("  ... (%zd values)\n", n - 2 * edge);
        j = n - edge - 1;
        continue;
      }
      std::printf("  [%zd] ", j);
      print_value(t, j);
      std::printf("\n");
    }
  }
}

void write_outputs(const std::vector<EValue>& outputs,
                   const std::string& prefix) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (!outputs[i].isTensor()) {
      continue;
    }
    const Tensor& t = outputs[i].toTensor();
    const std::string path = prefix + "-" + std::to_string(i) + ".bin";
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(t.const_data_ptr<char>(), static_cast<std::streamsize>(t.nbytes()));
    f.close();
    if (!f) {
      fail(1, "cannot write output " + std::to_string(i) + " to " + path);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  init_runner("pte_runner", kUsage, "PTE_RUNNER_LOG");
  Args a = parse_args(argc, argv);

  std::unique_ptr<Module> m =
      load_program(a.model, a.data, "--model_path", "--data_path");

  auto names = m->method_names();
  if (!names.ok()) {
    runtime_error("reading the method names of " + a.model, names.error());
  }
  if (names->count(a.method) == 0) {
    std::string have;
    for (const std::string& n : *names) {
      have += (have.empty() ? "" : ", ") + n;
    }
    fail(1, "the program has no method " + a.method + " (it has: " + have +
                ")");
  }
  auto meta = m->method_meta(a.method);
  if (!meta.ok()) {
    runtime_error("reading the meta of method " + a.method, meta.error());
  }
  std::vector<Input> inputs = load_inputs(a, *meta);

  clear_runtime_errors();
  Error err = m->load_method(a.method);
  if (err != Error::Ok) {
    runtime_error("loading method " + a.method, err);
  }

  std::vector<EValue> values;
  for (const Input& in : inputs) {
    values.emplace_back(*in.tensor);
  }
  std::vector<EValue> outputs;
  for (int64_t k = 0; k < a.executions; ++k) {
    clear_runtime_errors();
    auto out = m->execute(a.method, values);
    if (!out.ok()) {
      runtime_error("running " + a.method, out.error());
    }
    outputs = std::move(*out);
  }

  if (!a.output_prefix.empty()) {
    write_outputs(outputs, a.output_prefix);
  }
  if (a.print != Print::None) {
    print_outputs(outputs, a.print);
  }
  return 0;
}
