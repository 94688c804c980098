// pybind11 module cpu_attention_worker._kernel: validates numpy arguments, then runs the kernels
// (dispatch.h) with the GIL released. Bad arguments raise ValueError (std::invalid_argument)
// whose message starts with the argument's name.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings_common.h"
#include "dispatch.h"
#include "thread_pool.h"

namespace py = pybind11;
using namespace apex_serve::cpu_attention;
using namespace apex_serve::cpu_attention::bindings;

namespace {

constexpr int64_t kHeadDimMultiple = 16;
constexpr int64_t kMaxHeadDim = 512;
const char* const kIsaNames[] = {"portable", "avx2", "avx512", "avx512bf16"};
constexpr Isa kIsas[] = {Isa::kPortable, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16};

std::string num(int64_t value) { return std::to_string(value); }

}  // namespace

namespace apex_serve::cpu_attention::bindings {

void fail(const std::string& name, const std::string& problem) { throw std::invalid_argument(name + ": " + problem); }

std::string shape_of(const py::array& a) {
    std::string out = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) out += (i ? ", " : "") + num(a.shape(i));
    return out + (a.ndim() == 1 ? ",)" : ")");
}

void check_array(const py::array& a, const std::string& name, const py::dtype& dtype, py::ssize_t ndim) {
    if (!a.dtype().equal(dtype)) {
        fail(name, "expected dtype " + std::string(py::str(dtype)) + ", got " + std::string(py::str(a.dtype())));
    }
    if (a.ndim() != ndim) fail(name, "expected " + num(ndim) + " dimensions, got shape " + shape_of(a));
    if (!(a.flags() & py::array::c_style)) fail(name, "must be C-contiguous");
}

KvDtype parse_dtype(const std::string& dtype) {
    if (dtype == "float32") return KvDtype::kFloat32;
    if (dtype == "float16") return KvDtype::kFloat16;
    if (dtype == "bfloat16") return KvDtype::kBFloat16;
    fail("dtype", "expected 'float32', 'float16' or 'bfloat16', got '" + dtype + "'");
}

Isa parse_isa(const std::optional<std::string>& name) {
    if (!name) return best_isa();
    for (Isa isa : kIsas) {
        if (*name != kIsaNames[static_cast<int>(isa)]) continue;
        if (!isa_supported(isa)) fail("isa", "'" + *name + "' is not supported by this CPU");
        return isa;
    }
    fail("isa", "expected 'portable', 'avx2', 'avx512' or 'avx512bf16', got '" + *name + "'");
}

int check_threads(int num_threads) {
    if (num_threads < 1 || num_threads > kMaxThreads) {
        fail("num_threads", "expected 1 to " + num(kMaxThreads) + ", got " + num(num_threads));
    }
    return num_threads;
}

}  // namespace apex_serve::cpu_attention::bindings

namespace {

py::tuple supported_isas() {
    py::list names;
    for (Isa isa : kIsas) {
        if (isa_supported(isa)) names.append(kIsaNames[static_cast<int>(isa)]);
    }
    return py::tuple(names);
}

py::dtype storage_dtype(KvDtype dtype) {
    return dtype == KvDtype::kFloat32 ? py::dtype::of<float>() : py::dtype::of<uint16_t>();
}

// Checks both caches ([num_blocks, num_kv_heads, block_size, head_dim], identical shapes) and
// fills the cache dimensions of the returned shape.
PagedShape check_caches(const py::array& k_cache, const py::array& v_cache, KvDtype dtype) {
    check_array(k_cache, "k_cache", storage_dtype(dtype), 4);
    check_array(v_cache, "v_cache", storage_dtype(dtype), 4);
    for (int i = 0; i < 4; ++i) {
        if (v_cache.shape(i) != k_cache.shape(i)) {
            fail("v_cache", "shape " + shape_of(v_cache) + " differs from k_cache " + shape_of(k_cache));
        }
        if (k_cache.shape(i) == 0) fail("k_cache", "dimensions must be positive, got shape " + shape_of(k_cache));
    }
    PagedShape s{};
    s.num_blocks = k_cache.shape(0);
    s.num_kv_heads = k_cache.shape(1);
    s.block_size = k_cache.shape(2);
    s.head_dim = k_cache.shape(3);
    if (s.head_dim % kHeadDimMultiple != 0 || s.head_dim > kMaxHeadDim) {
        fail("k_cache", "head_dim " + num(s.head_dim) + " is unsupported: expected a multiple of " +
                            num(kHeadDimMultiple) + " up to " + num(kMaxHeadDim));
    }
    return s;
}

// Fills the row dimensions of s from q and block_tables; checks every index the kernel will read.
void check_rows(const py::array& q, const py::array& block_tables, const py::array& context_lens, PagedShape& s) {
    check_array(q, "q", py::dtype::of<float>(), 3);
    s.num_rows = q.shape(0);
    s.num_q_heads = q.shape(1);
    if (q.shape(2) != s.head_dim) {
        fail("q", "head_dim " + num(q.shape(2)) + " differs from the cache's " + num(s.head_dim));
    }
    if (s.num_q_heads == 0 || s.num_q_heads % s.num_kv_heads != 0) {
        fail("q", "num_q_heads " + num(s.num_q_heads) + " is not a positive multiple of num_kv_heads " +
                      num(s.num_kv_heads));
    }
    check_array(block_tables, "block_tables", py::dtype::of<int32_t>(), 2);
    if (block_tables.shape(0) != s.num_rows) {
        fail("block_tables", "shape " + shape_of(block_tables) + " does not match num_rows=" + num(s.num_rows));
    }
    s.max_blocks_per_row = block_tables.shape(1);
    check_array(context_lens, "context_lens", py::dtype::of<int32_t>(), 1);
    if (context_lens.shape(0) != s.num_rows) {
        fail("context_lens", "shape " + shape_of(context_lens) + " does not match num_rows=" + num(s.num_rows));
    }
    const auto lens = context_lens.unchecked<int32_t, 1>();
    const auto tables = block_tables.unchecked<int32_t, 2>();
    const int64_t capacity = s.max_blocks_per_row * s.block_size;
    for (int64_t r = 0; r < s.num_rows; ++r) {
        if (lens(r) < 1 || lens(r) > capacity) {
            fail("context_lens[" + num(r) + "]",
                 num(lens(r)) + " outside [1, " + num(capacity) + "] (max_blocks_per_row x block_size)");
        }
        for (int64_t b = 0; b * s.block_size < lens(r); ++b) {
            if (tables(r, b) < 0 || tables(r, b) >= s.num_blocks) {
                fail("block_tables[" + num(r) + ", " + num(b) + "]",
                     "block id " + num(tables(r, b)) + " outside [0, " + num(s.num_blocks) + ")");
            }
        }
    }
}

py::array_t<float> output_for(const std::optional<py::array>& out, const PagedShape& s) {
    if (!out) return py::array_t<float>({s.num_rows, s.num_q_heads, s.head_dim});
    check_array(*out, "out", py::dtype::of<float>(), 3);
    if (out->shape(0) != s.num_rows || out->shape(1) != s.num_q_heads || out->shape(2) != s.head_dim) {
        fail("out", "shape " + shape_of(*out) + " is not [num_rows, num_q_heads, head_dim] = (" + num(s.num_rows) +
                        ", " + num(s.num_q_heads) + ", " + num(s.head_dim) + ")");
    }
    if (!out->writeable()) fail("out", "must be writeable");
    return py::array_t<float>::ensure(*out);
}

// Validated arguments of an attention call (or of its read probe).
AttentionArgs attention_args(const py::array& q, const py::array& k_cache, const py::array& v_cache,
                             const py::array& block_tables, const py::array& context_lens,
                             std::optional<double> scale, int num_threads, KvDtype dtype) {
    PagedShape s = check_caches(k_cache, v_cache, dtype);
    check_rows(q, block_tables, context_lens, s);
    const double scale_value = scale.value_or(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
    if (!std::isfinite(scale_value)) fail("scale", "must be finite, got " + std::to_string(scale_value));
    check_threads(num_threads);
    return AttentionArgs{static_cast<const float*>(q.data()), k_cache.data(), v_cache.data(),
                         static_cast<const int32_t*>(block_tables.data()),
                         static_cast<const int32_t*>(context_lens.data()), s, static_cast<float>(scale_value),
                         kPrefetchDistance};
}

py::array_t<float> attention(const py::array& q, const py::array& k_cache, const py::array& v_cache,
                             const py::array& block_tables, const py::array& context_lens,
                             std::optional<double> scale, int num_threads, const std::string& dtype_name,
                             const std::optional<std::string>& isa_name, const std::optional<py::array>& out) {
    const KvDtype dtype = parse_dtype(dtype_name);
    const Isa isa = parse_isa(isa_name);
    const AttentionArgs args =
        attention_args(q, k_cache, v_cache, block_tables, context_lens, scale, num_threads, dtype);
    py::array_t<float> result = output_for(out, args.shape);  // [num_rows, num_q_heads, head_dim]
    float* out_data = result.mutable_data();
    py::gil_scoped_release release;
    paged_attention(args, dtype, isa, num_threads, out_data);
    return result;
}

void read_probe(const py::array& q, const py::array& k_cache, const py::array& v_cache, const py::array& block_tables,
                const py::array& context_lens, int num_threads, const std::string& dtype_name,
                const std::optional<std::string>& isa_name) {
    const KvDtype dtype = parse_dtype(dtype_name);
    const Isa isa = parse_isa(isa_name);
    const AttentionArgs args =
        attention_args(q, k_cache, v_cache, block_tables, context_lens, std::nullopt, num_threads, dtype);
    py::gil_scoped_release release;
    paged_read(args, dtype, isa, num_threads);
}

// Fills s.num_rows from k_new; checks the new lines and every slot the copy will write.
void check_new_lines(const py::array& k_new, const py::array& v_new, const py::array& slot_mapping, KvDtype dtype,
                     PagedShape& s) {
    check_array(k_new, "k_new", storage_dtype(dtype), 3);
    check_array(v_new, "v_new", storage_dtype(dtype), 3);
    s.num_rows = k_new.shape(0);
    if (k_new.shape(1) != s.num_kv_heads || k_new.shape(2) != s.head_dim) {
        fail("k_new", "shape " + shape_of(k_new) + " is not [num_rows, num_kv_heads=" + num(s.num_kv_heads) +
                          ", head_dim=" + num(s.head_dim) + "]");
    }
    for (int i = 0; i < 3; ++i) {
        if (v_new.shape(i) != k_new.shape(i)) {
            fail("v_new", "shape " + shape_of(v_new) + " differs from k_new " + shape_of(k_new));
        }
    }
    check_array(slot_mapping, "slot_mapping", py::dtype::of<int64_t>(), 1);
    if (slot_mapping.shape(0) != s.num_rows) {
        fail("slot_mapping", "shape " + shape_of(slot_mapping) + " does not match num_rows=" + num(s.num_rows));
    }
    const auto slots = slot_mapping.unchecked<int64_t, 1>();
    const int64_t num_slots = s.num_blocks * s.block_size;
    for (int64_t r = 0; r < s.num_rows; ++r) {
        if (slots(r) < 0 || slots(r) >= num_slots) {
            fail("slot_mapping[" + num(r) + "]", "slot " + num(slots(r)) + " outside [0, " + num(num_slots) + ")");
        }
    }
}

void append(py::array k_cache, py::array v_cache, const py::array& k_new, const py::array& v_new,
            const py::array& slot_mapping, const std::string& dtype_name) {
    const KvDtype dtype = parse_dtype(dtype_name);
    PagedShape s = check_caches(k_cache, v_cache, dtype);
    if (!k_cache.writeable()) fail("k_cache", "must be writeable");
    if (!v_cache.writeable()) fail("v_cache", "must be writeable");
    check_new_lines(k_new, v_new, slot_mapping, dtype, s);
    const size_t element_size = static_cast<size_t>(k_cache.itemsize());
    auto* k_dst = static_cast<std::byte*>(k_cache.mutable_data());
    auto* v_dst = static_cast<std::byte*>(v_cache.mutable_data());
    const auto* slots = static_cast<const int64_t*>(slot_mapping.data());
    py::gil_scoped_release release;
    append_lines(k_dst, static_cast<const std::byte*>(k_new.data()), slots, s, element_size);
    append_lines(v_dst, static_cast<const std::byte*>(v_new.data()), slots, s, element_size);
}

std::vector<double> read_rate(const py::array& buffer, int num_threads, int repeats,
                              const std::optional<std::string>& isa_name) {
    check_array(buffer, "buffer", py::dtype::of<float>(), 1);
    check_threads(num_threads);
    if (repeats < 1) fail("repeats", "must be >= 1, got " + num(repeats));
    const Isa isa = parse_isa(isa_name);
    const auto* data = static_cast<const float*>(buffer.data());
    const auto count = static_cast<size_t>(buffer.shape(0));
    py::gil_scoped_release release;
    return read_bandwidth(data, count, num_threads, repeats, isa);
}

double fma_rate(int num_threads, int64_t iterations, const std::optional<std::string>& isa_name) {
    check_threads(num_threads);
    if (iterations < 1) fail("iterations", "must be >= 1, got " + num(iterations));
    const Isa isa = parse_isa(isa_name);
    py::gil_scoped_release release;
    return fma_throughput(num_threads, iterations, isa);
}

void set_cpus(const std::vector<int>& cpus) { ThreadPool::instance().set_cpus(cpus); }

void set_spin(int64_t spin_us) {
    if (spin_us < 0) fail("spin_us", "must be >= 0, got " + num(spin_us));
    ThreadPool::instance().set_spin_us(spin_us);
}

}  // namespace

PYBIND11_MODULE(_kernel, m) {
    m.doc() = "CPU paged decode attention over a paged KV cache (fp32 math; float32/float16/bfloat16 storage).";
    m.attr("ISA") = kIsaNames[static_cast<int>(best_isa())];
    m.attr("ISAS") = supported_isas();
    m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");
    m.def("paged_decode_attention", &attention, py::arg("q").noconvert(), py::arg("k_cache").noconvert(),
          py::arg("v_cache").noconvert(), py::arg("block_tables").noconvert(), py::arg("context_lens").noconvert(),
          py::arg("scale") = py::none(), py::arg("num_threads") = 1, py::arg("dtype") = "float32",
          py::arg("isa") = py::none(), py::arg("out") = py::none(),
          "Decode attention of each row's query over its paged K/V; returns [num_rows, num_q_heads, head_dim] "
          "float32 (written into out when given). Half storage is passed as uint16 with dtype 'float16' or "
          "'bfloat16'. isa: None for the best this CPU has.");
    m.def("paged_read", &read_probe, py::arg("q").noconvert(), py::arg("k_cache").noconvert(),
          py::arg("v_cache").noconvert(), py::arg("block_tables").noconvert(), py::arg("context_lens").noconvert(),
          py::arg("num_threads") = 1, py::arg("dtype") = "float32", py::arg("isa") = py::none(),
          "Reads every K and V line paged_decode_attention would read, split, ordered and prefetched the same "
          "way, with no arithmetic: the memory ceiling of the paged layout (a benchmark probe).");
    m.def("append_kv", &append, py::arg("k_cache").noconvert(), py::arg("v_cache").noconvert(),
          py::arg("k_new").noconvert(), py::arg("v_new").noconvert(), py::arg("slot_mapping").noconvert(),
          py::arg("dtype") = "float32",
          "Writes each row's new k/v [num_rows, num_kv_heads, head_dim] into its slot of the caches, in place.");
    m.def("read_bandwidth", &read_rate, py::arg("buffer").noconvert(), py::arg("num_threads") = 1,
          py::arg("repeats") = 1, py::arg("isa") = py::none(),
          "GB/s of each pass of a streaming read of a float32 buffer split over num_threads threads.");
    m.def("fma_throughput", &fma_rate, py::arg("num_threads") = 1, py::arg("iterations") = 10'000'000,
          py::arg("isa") = py::none(), "GFLOP/s of independent FMA chains on num_threads threads.");
    m.def("set_thread_cpus", &set_cpus, py::arg("cpus"),
          "Pin helper thread k to cpus[k % len(cpus)] (the calling thread is worker 0); [] unpins.");
    m.def("set_spin_us", &set_spin, py::arg("spin_us"),
          "How long an idle helper spins for the next call before it sleeps.");
    bind_serving(m);
}
