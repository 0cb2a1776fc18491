// Which copy of a CPU kernel runs: the best instruction set this CPU has, or the
// one an environment variable names (read on every call, so tests and benchmarks
// can switch). Shared by linear (JAKIRO_LINEAR_KERNEL) and tree_attention
// (JAKIRO_TREE_ATTENTION_KERNEL).
#pragma once

#include <cstdlib>
#include <cstring>

#include "jakiro/checks.h"

namespace jakiro {

enum class CpuIsa { kFallback, kAvx2, kAvx512, kAvx512Bf16, kAmx };

// This CPU has AMX-BF16 and Linux grants its tile state (csrc/cpu/linear_amx.cpp;
// false where the linear copies are not built).
bool amx_usable();

struct CpuIsaChoice {
  CpuIsa isa;
  bool forced;  // named by the variable rather than picked
};

// `env` takes auto (or unset), amx and avx512bf16 (where `bf16_copy`), avx512, avx2
// or `fallback` (the kernel's other path); `x86_copies`: whether the caller compiled
// its AVX2 and AVX-512 copies; `bf16_copy`: whether it also has copies built on
// AMX tiles and on AVX512_BF16's dot products (kAmx, kAvx512Bf16, picked by auto
// where the CPU has them).
// `v` is the variable's value (nullptr: unset), `env` its name for the messages.
inline CpuIsaChoice choose_cpu_isa_value(const char* v, const char* env, const char* fallback, bool x86_copies,
                                         const char* op, bool bf16_copy = false) {
  const bool any = v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0;
  if (!any && std::strcmp(v, fallback) == 0) return {CpuIsa::kFallback, true};
  const bool amx = bf16_copy && !any && std::strcmp(v, "amx") == 0;
  const bool bf16 = bf16_copy && !any && std::strcmp(v, "avx512bf16") == 0;
  const bool avx512 = !any && std::strcmp(v, "avx512") == 0, avx2 = !any && std::strcmp(v, "avx2") == 0;
  JAKIRO_CHECK(any || amx || bf16 || avx512 || avx2, op, "environment variable ", env, " must be auto, ",
               bf16_copy ? "amx, avx512bf16, " : "", "avx512, avx2 or ", fallback, ", got '", v, "'");
  bool has_amx = false, has_bf16 = false, has_avx512 = false, has_avx2 = false;
#if defined(__GNUC__) && defined(__x86_64__)
  if (x86_copies) {
    has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
    has_bf16 = bf16_copy && has_avx512 && __builtin_cpu_supports("avx512bf16");
    has_amx = has_bf16 && amx_usable();
    has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#endif
  JAKIRO_CHECK(!amx || has_amx, op, env, "=amx but this build or CPU has no AMX-BF16 (or Linux refused its tiles)");
  JAKIRO_CHECK(!bf16 || has_bf16, op, env, "=avx512bf16 but this build or CPU has no AVX512_BF16");
  JAKIRO_CHECK(!avx512 || has_avx512, op, env, "=avx512 but this build or CPU has no AVX-512");
  JAKIRO_CHECK(!avx2 || has_avx2, op, env, "=avx2 but this build or CPU has no AVX2 and FMA");
  if ((any || amx) && has_amx) return {CpuIsa::kAmx, !any};
  if ((any || bf16) && has_bf16) return {CpuIsa::kAvx512Bf16, !any};
  if ((any || avx512) && has_avx512) return {CpuIsa::kAvx512, !any};
  if (has_avx2) return {CpuIsa::kAvx2, !any};
  return {CpuIsa::kFallback, false};
}

// The same, reading the variable `env`.
inline CpuIsaChoice choose_cpu_isa(const char* env, const char* fallback, bool x86_copies, const char* op,
                                   bool bf16_copy = false) {
  return choose_cpu_isa_value(std::getenv(env), env, fallback, x86_copies, op, bf16_copy);
}

}  // namespace jakiro
