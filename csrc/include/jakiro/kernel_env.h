// Kernel-selection environment variables, one per op family: JAKIRO_<OP>_KERNEL
// (docs/kernels.md, "Environment overrides"). Read on every call, so tests and
// benchmarks can switch them in one process. Host code.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <set>
#include <string>

namespace jakiro {

struct KernelEnv {
  const char* value;  // nullptr when neither variable is set (or set to ""): auto
  const char* name;   // the variable the value came from, for error messages
};

// The value of the variable `name`, or, where only its deprecated alias is set,
// the alias's value with a warning (once per alias and process, or every time
// under torch.set_warn_always(True)) to use `name` instead. `name` wins when
// both are set; a variable set to "" counts as unset.
inline KernelEnv read_kernel_env(const char* name, const char* deprecated_alias = nullptr) {
  const char* value = std::getenv(name);
  if (value != nullptr && *value != '\0') return {value, name};
  const char* old = deprecated_alias != nullptr ? std::getenv(deprecated_alias) : nullptr;
  if (old == nullptr || *old == '\0') return {nullptr, name};
  static std::mutex mutex;
  static std::set<std::string> warned;
  bool first;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    first = warned.insert(deprecated_alias).second;
  }
  if (first || c10::WarningUtils::get_warnAlways()) {
    TORCH_WARN("environment variable ", deprecated_alias, " is deprecated and will be removed in the next "
               "release: use ", name, " (same values)");
  }
  return {old, deprecated_alias};
}

}  // namespace jakiro
