// llm_step_runner: drive an ExecuTorch LLM `.pte` (KV cache inside the
// program) one call at a time, the way ExecuTorch's text LLM runner does, and
// report the argmax token, the timing and (optionally) the logits of every
// call.
//
//   llm_step_runner --model PATH.pte [--data PATH.ptd] --prompt 1,2,3
//                   --steps N [--feed 5,6,7] [--out logits.bin] [--warmup K]
//
// Protocol (ExecuTorch extension/llm/runner, text_prefiller.cpp and
// text_decoder_runner.cpp): method `forward(tokens int64[1, T],
// input_pos int64[1]) -> logits[1, vocab]` (a [1, T, vocab] output is read at
// its last position). The method is loaded once and kept between calls, so
// the cache the program holds survives from call to call. The prompt is
// prefilled in one call at input_pos = [0]; then each of the N decode calls
// feeds one token at input_pos = [pos]: the previous call's argmax (greedy),
// or the next --feed token (teacher forcing). When the method declares
// input_pos with more than one element, it gets one position per token
// ([pos, pos + 1, ...]), as the LLM runner does.
//
// stdout: one JSON document
//   {"tokens": [argmax of each call: prefill first, then each decode call],
//    "prefill_ms": float, "decode_ms": [one per decode call], "vocab": V,
//    "load_ms": float}
// --out: float32 logits of every call, row-major [1 + N, V].
// --warmup K: run the whole sequence (prefill + N decode calls, positions from
// 0 again; the cache is overwritten by position) K times before the one that
// is reported.
// Errors: one line `llm_step_runner: error: ...` on stderr; exit 2 for usage
// errors, 1 for everything else.

#include "common/runner_common.h"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/core/exec_aten/util/scalar_type_util.h>

#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using qlower_runner::clear_runtime_errors;
using qlower_runner::fail;
using qlower_runner::init_runner;
using qlower_runner::load_program;
using qlower_runner::runtime_error;
using qlower_runner::usage_error;

namespace {

const char* kUsage =
    "usage: llm_step_runner --model PATH.pte [--data PATH.ptd] "
    "--prompt 1,2,3 --steps N [--feed 5,6,7] [--out logits.bin] "
    "[--warmup K]";

// -------------------------------------------------------------- arguments --

struct Args {
  std::string model;
  std::string data;
  std::vector<int64_t> prompt;
  std::vector<int64_t> feed;
  bool has_feed = false;
  int64_t steps = -1;
  std::string out;
  int64_t warmup = 0;
};

bool parse_int(const std::string& s, int64_t* v) {
  if (s.empty() || s.size() > 18) {
    return false;
  }
  int64_t x = 0;
  for (char c : s) {
    if (c < '0' || c > '9') {
      return false;
    }
    x = x * 10 + (c - '0');
  }
  *v = x;
  return true;
}

std::vector<int64_t> parse_token_list(const std::string& flag,
                                      const std::string& s) {
  std::vector<int64_t> out;
  size_t start = 0;
  while (true) {
    size_t comma = s.find(',', start);
    std::string item = s.substr(
        start, comma == std::string::npos ? std::string::npos : comma - start);
    int64_t v = 0;
    if (!parse_int(item, &v)) {
      usage_error(
          flag + " takes comma-separated non-negative token ids (got '" + s +
          "')");
    }
    out.push_back(v);
    if (comma == std::string::npos) {
      break;
    }
    start = comma + 1;
  }
  return out;
}

Args parse_args(int argc, char** argv) {
  Args a;
  bool seen_model = false, seen_prompt = false;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    std::string value;
    size_t eq = flag.find('=');
    if (flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
    } else if (flag == "-h" || flag == "--help") {
      std::printf("%s\n", kUsage);
      std::exit(0);
    } else {
      if (i + 1 >= argc) {
        usage_error(flag + " needs a value");
      }
      value = argv[++i];
    }
    if (flag == "--model") {
      a.model = value;
      seen_model = true;
    } else if (flag == "--data") {
      a.data = value;
    } else if (flag == "--prompt") {
      a.prompt = parse_token_list("--prompt", value);
      seen_prompt = true;
    } else if (flag == "--feed") {
      a.feed = parse_token_list("--feed", value);
      a.has_feed = true;
    } else if (flag == "--steps") {
      if (!parse_int(value, &a.steps)) {
        usage_error("--steps takes a non-negative integer (got '" + value +
                    "')");
      }
    } else if (flag == "--out") {
      a.out = value;
    } else if (flag == "--warmup") {
      if (!parse_int(value, &a.warmup)) {
        usage_error("--warmup takes a non-negative integer (got '" + value +
                    "')");
      }
    } else {
      usage_error("unknown option " + flag);
    }
  }
  if (!seen_model || a.model.empty()) {
    usage_error("--model is required");
  }
  if (!seen_prompt) {
    usage_error("--prompt is required");
  }
  if (a.steps < 0) {
    usage_error("--steps is required");
  }
  if (a.has_feed && static_cast<int64_t>(a.feed.size()) != a.steps) {
    usage_error(
        "--feed has " + std::to_string(a.feed.size()) +
        " token(s) but --steps is " + std::to_string(a.steps) +
        " (one fed token per decode call)");
  }
  return a;
}

// --------------------------------------------------------------- running --

// Value of a constant method such as get_max_seq_len, or -1 when the program
// does not have it.
int64_t constant_method(Module& m, const std::string& name) {
  auto names = m.method_names();
  if (!names.ok() || names->count(name) == 0) {
    return -1;
  }
  clear_runtime_errors();
  auto r = m.execute(name);
  if (!r.ok()) {
    runtime_error("running " + name, r.error());
  }
  if (r->empty() || !(*r)[0].isInt()) {
    return -1;
  }
  return (*r)[0].toInt();
}

struct Plan {
  bool positions_per_token = false;  // input_pos declared with > 1 element
  int64_t max_tokens_per_call = -1;  // declared upper bound of tokens dim 1
};

struct RunResult {
  std::vector<int64_t> tokens;
  double prefill_ms = 0;
  std::vector<double> decode_ms;
  int64_t vocab = -1;
  std::vector<float> logits;  // [calls, vocab]
};

int64_t argmax(const std::vector<float>& row) {
  int64_t best = 0;
  float best_v = -INFINITY;
  bool found = false;
  for (size_t i = 0; i < row.size(); ++i) {
    if (std::isnan(row[i])) {
      continue;
    }
    if (!found || row[i] > best_v) {
      best = static_cast<int64_t>(i);
      best_v = row[i];
      found = true;
    }
  }
  return best;
}

// The last position's logits of the output, as float.
std::vector<float> last_logits(const Tensor& t) {
  if (t.dim() < 1 || t.numel() == 0) {
    fail(1, "forward returned an empty logits tensor");
  }
  const int64_t vocab = t.size(t.dim() - 1);
  const int64_t offset = t.numel() - vocab;
  std::vector<float> row(static_cast<size_t>(vocab));
  switch (t.scalar_type()) {
    case ScalarType::Float: {
      const float* p = t.const_data_ptr<float>() + offset;
      std::copy(p, p + vocab, row.begin());
      break;
    }
    case ScalarType::Half: {
      const auto* p = t.const_data_ptr<executorch::aten::Half>() + offset;
      for (int64_t i = 0; i < vocab; ++i) {
        row[i] = static_cast<float>(p[i]);
      }
      break;
    }
    case ScalarType::BFloat16: {
      const auto* p = t.const_data_ptr<executorch::aten::BFloat16>() + offset;
      for (int64_t i = 0; i < vocab; ++i) {
        row[i] = static_cast<float>(p[i]);
      }
      break;
    }
    default:
      fail(1, std::string("forward returned logits of dtype ") +
                  executorch::runtime::toString(t.scalar_type()) +
                  "; expected float32, float16 or bfloat16");
  }
  return row;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now() - t0)
      .count();
}

// One call of forward: tokens at positions start_pos, start_pos + 1, ...
std::vector<float> step(
    Module& m,
    const Plan& plan,
    std::vector<int64_t>& tokens,
    int64_t start_pos,
    double* ms,
    const char* what) {
  const int32_t n = static_cast<int32_t>(tokens.size());
  auto tokens_t = from_blob(tokens.data(), {1, n}, ScalarType::Long);
  std::vector<int64_t> pos;
  if (plan.positions_per_token) {
    for (int32_t i = 0; i < n; ++i) {
      pos.push_back(start_pos + i);
    }
  } else {
    pos.push_back(start_pos);
  }
  auto pos_t = from_blob(
      pos.data(), {static_cast<int32_t>(pos.size())}, ScalarType::Long);
  std::vector<EValue> inputs{EValue(*tokens_t), EValue(*pos_t)};
  clear_runtime_errors();
  auto t0 = std::chrono::steady_clock::now();
  auto out = m.execute("forward", inputs);
  if (!out.ok()) {
    runtime_error(
        std::string(what) + " at input_pos " + std::to_string(start_pos),
        out.error());
  }
  if (out->empty() || !(*out)[0].isTensor()) {
    fail(1, "forward did not return a logits tensor");
  }
  std::vector<float> row = last_logits((*out)[0].toTensor());
  *ms = ms_since(t0);
  return row;
}

RunResult run_sequence(Module& m, const Plan& plan, const Args& a) {
  RunResult r;
  std::vector<int64_t> prompt = a.prompt;
  std::vector<float> row = step(m, plan, prompt, 0, &r.prefill_ms, "prefill");
  r.vocab = static_cast<int64_t>(row.size());
  r.tokens.push_back(argmax(row));
  r.logits.insert(r.logits.end(), row.begin(), row.end());
  for (int64_t v : a.feed) {
    if (v >= r.vocab) {
      fail(1, "--feed token " + std::to_string(v) +
                  " is outside the vocabulary (" + std::to_string(r.vocab) +
                  " logits)");
    }
  }
  int64_t pos = static_cast<int64_t>(a.prompt.size());
  for (int64_t s = 0; s < a.steps; ++s, ++pos) {
    std::vector<int64_t> tok{a.has_feed ? a.feed[s] : r.tokens.back()};
    double ms = 0;
    row = step(m, plan, tok, pos, &ms, "decode");
    r.decode_ms.push_back(ms);
    r.tokens.push_back(argmax(row));
    r.logits.insert(r.logits.end(), row.begin(), row.end());
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  init_runner("llm_step_runner", kUsage, "LLM_STEP_RUNNER_LOG");

  Args a = parse_args(argc, argv);

  auto load_t0 = std::chrono::steady_clock::now();
  std::unique_ptr<Module> m = load_program(a.model, a.data, "--model", "--data");

  auto meta = m->method_meta("forward");
  if (!meta.ok()) {
    runtime_error("the program has no method forward", meta.error());
  }
  if (meta->num_inputs() != 2) {
    fail(1, "forward takes " + std::to_string(meta->num_inputs()) +
                " inputs; expected 2 (tokens [1, T], input_pos) of a "
                "KV-cache LLM");
  }
  Plan plan;
  for (size_t i = 0; i < 2; ++i) {
    auto info = meta->input_tensor_meta(i);
    if (!info.ok()) {
      runtime_error("forward input " + std::to_string(i) + " is not a tensor",
                    info.error());
    }
    if (info->scalar_type() != ScalarType::Long) {
      fail(1, "forward input " + std::to_string(i) + " is " +
                  executorch::runtime::toString(info->scalar_type()) +
                  "; expected int64");
    }
    auto sizes = info->sizes();
    if (i == 0) {
      if (sizes.size() != 2) {
        fail(1, "forward input 0 (tokens) has " +
                    std::to_string(sizes.size()) + " dims; expected [1, T]");
      }
      plan.max_tokens_per_call = sizes[1];
    } else {
      plan.positions_per_token = sizes.size() >= 1 && sizes[0] > 1;
    }
  }

  // Check what the runtime would not: positions past the cache leave the
  // delegate unusable, and token ids are not range-checked.
  const int64_t prompt_len = static_cast<int64_t>(a.prompt.size());
  if (prompt_len > plan.max_tokens_per_call) {
    fail(1, "the prompt has " + std::to_string(prompt_len) +
                " tokens; forward takes at most " +
                std::to_string(plan.max_tokens_per_call) + " per call");
  }
  const int64_t max_seq_len = constant_method(*m, "get_max_seq_len");
  const int64_t max_context_len = constant_method(*m, "get_max_context_len");
  int64_t cache_len = max_context_len > 0 ? max_context_len : max_seq_len;
  if (cache_len > 0 && prompt_len + a.steps > cache_len) {
    fail(1, "prompt (" + std::to_string(prompt_len) + ") + steps (" +
                std::to_string(a.steps) + ") = " +
                std::to_string(prompt_len + a.steps) +
                " positions; the program's cache holds " +
                std::to_string(cache_len));
  }
  const int64_t vocab_meta = constant_method(*m, "get_vocab_size");
  if (vocab_meta > 0) {
    for (int64_t v : a.prompt) {
      if (v >= vocab_meta) {
        fail(1, "--prompt token " + std::to_string(v) +
                    " is outside the vocabulary (get_vocab_size = " +
                    std::to_string(vocab_meta) + ")");
      }
    }
    for (int64_t v : a.feed) {
      if (v >= vocab_meta) {
        fail(1, "--feed token " + std::to_string(v) +
                    " is outside the vocabulary (get_vocab_size = " +
                    std::to_string(vocab_meta) + ")");
      }
    }
  }

  clear_runtime_errors();
  Error err = m->load_method("forward");
  if (err != Error::Ok) {
    runtime_error("loading method forward", err);
  }
  const double load_ms = ms_since(load_t0);

  RunResult r;
  for (int64_t k = 0; k <= a.warmup; ++k) {
    r = run_sequence(*m, plan, a);
  }

  if (!a.out.empty()) {
    std::ofstream f(a.out, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(r.logits.data()),
            static_cast<std::streamsize>(r.logits.size() * sizeof(float)));
    f.close();
    if (!f) {
      fail(1, "cannot write --out " + a.out);
    }
  }

  std::string json = "{\"tokens\": [";
  for (size_t i = 0; i < r.tokens.size(); ++i) {
    json += (i ? ", " : "") + std::to_string(r.tokens[i]);
  }
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.3f", r.prefill_ms);
  json += "], \"prefill_ms\": ";
  json += buf;
  json += ", \"decode_ms\": [";
  for (size_t i = 0; i < r.decode_ms.size(); ++i) {
    std::snprintf(buf, sizeof(buf), "%s%.3f", i ? ", " : "", r.decode_ms[i]);
    json += buf;
  }
  std::snprintf(buf, sizeof(buf), "%.3f", load_ms);
  json += "], \"vocab\": " + std::to_string(r.vocab) + ", \"load_ms\": " +
      buf + "}";
  std::printf("%s\n", json.c_str());
  return 0;
}
