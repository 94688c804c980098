// Argument checks shared by the pybind11 files (bindings.cpp, bindings_serving.cpp). Bad arguments
// raise ValueError (std::invalid_argument) whose message starts with the argument's name.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>

#include "paged_attention.h"

namespace apex_serve::cpu_attention::bindings {

constexpr int kMaxThreads = 1024;
// Chunks ahead that each stream prefetches: 1 to 32 measured the same here; none lost 25-40%.
constexpr int64_t kPrefetchDistance = 2;

[[noreturn]] void fail(const std::string& name, const std::string& problem);
std::string shape_of(const pybind11::array& a);
void check_array(const pybind11::array& a, const std::string& name, const pybind11::dtype& dtype,
                 pybind11::ssize_t ndim);
KvDtype parse_dtype(const std::string& dtype);
Isa parse_isa(const std::optional<std::string>& name);  // None: the best this CPU runs
int check_threads(int num_threads);

void bind_serving(pybind11::module_& m);  // the data plane's serving loop and doorbell client

}  // namespace apex_serve::cpu_attention::bindings
