// Bindings of the data plane: the serving loop (cpu_attention_worker side) and the doorbell client
// (gpu_worker side) over regions mapped by Python (numpy uint8 views of the shared-memory segments,
// kept alive by the bound objects). Blocking calls release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <string>

#include "bindings_common.h"
#include "doorbell_client.h"
#include "serving_loop.h"

namespace py = pybind11;

namespace apex_serve::cpu_attention::bindings {

namespace {

std::string num(int64_t value) { return std::to_string(value); }

// A writeable, C-contiguous uint8 region of at least min_bytes.
std::byte* region(const py::array& a, const std::string& name, int64_t min_bytes) {
    check_array(a, name, py::dtype::of<uint8_t>(), 1);
    if (!a.writeable()) fail(name, "must be writeable");
    if (a.shape(0) < min_bytes) fail(name, num(a.shape(0)) + " bytes, the layout needs " + num(min_bytes));
    if (reinterpret_cast<uintptr_t>(a.data()) % kCacheLine != 0) fail(name, "must be 64-byte aligned");
    return static_cast<std::byte*>(const_cast<void*>(a.data()));
}

int64_t field(const py::dict& geometry, const char* key) {
    if (!geometry.contains(key)) fail("geometry", std::string("missing '") + key + "'");
    const auto value = geometry[key].cast<int64_t>();
    if (value < 0) fail(std::string("geometry[") + key + "]", "must be >= 0, got " + num(value));
    return value;
}

// Checks that a tensor of `bytes` at `offset` lies inside [0, limit) and is aligned for its elements.
void check_span(const char* name, int64_t offset, int64_t bytes, int64_t limit, int64_t alignment) {
    if (offset % alignment != 0) fail(std::string("geometry[") + name + "]", "misaligned offset " + num(offset));
    if (offset + bytes > limit) {
        fail(std::string("geometry[") + name + "]", "ends at " + num(offset + bytes) + ", past " + num(limit));
    }
}

DataPlaneGeometry geometry_from(const py::dict& d, KvDtype dtype) {
    DataPlaneGeometry g{};
    g.num_layers = field(d, "num_layers");
    g.num_q_heads = field(d, "num_q_heads");
    g.num_kv_heads = field(d, "num_kv_heads");
    g.head_dim = field(d, "head_dim");
    g.block_size = field(d, "block_size");
    g.num_blocks = field(d, "num_blocks");
    g.max_rows = field(d, "max_rows");
    g.max_blocks_per_row = field(d, "max_blocks_per_row");
    g.num_slots = field(d, "num_slots");
    g.dtype = dtype;
    g.k_cache = field(d, "k_cache");
    g.v_cache = field(d, "v_cache");
    g.staging_slot_bytes = field(d, "staging_slot_bytes");
    g.q = field(d, "q");
    g.k = field(d, "k");
    g.v = field(d, "v");
    g.o = field(d, "o");
    g.meta_slot_bytes = field(d, "meta_slot_bytes");
    g.num_rows = field(d, "num_rows");
    g.block_tables = field(d, "block_tables");
    g.context_lens = field(d, "context_lens");
    g.slot_mapping = field(d, "slot_mapping");
    if (g.num_layers < 1 || g.num_blocks < 1 || g.block_size < 1 || g.max_blocks_per_row < 1 || g.num_kv_heads < 1 ||
        g.num_q_heads % g.num_kv_heads != 0 || g.head_dim % 16 != 0 || g.head_dim == 0) {
        fail("geometry", "inconsistent shape");
    }
    if (g.num_slots < 1 || g.num_slots > kMaxSlots) fail("geometry[num_slots]", "outside [1, " + num(kMaxSlots) + "]");
    const auto elem = static_cast<int64_t>(g.element_size());
    const int64_t q_bytes = g.max_rows * g.num_q_heads * g.head_dim * 4;
    const int64_t kv_bytes = g.max_rows * g.num_kv_heads * g.head_dim * elem;
    check_span("q", g.q, q_bytes, g.staging_slot_bytes, 4);
    check_span("k", g.k, kv_bytes, g.staging_slot_bytes, elem);
    check_span("v", g.v, kv_bytes, g.staging_slot_bytes, elem);
    check_span("o", g.o, q_bytes, g.staging_slot_bytes, 4);
    check_span("num_rows", g.num_rows, 4, g.meta_slot_bytes, 4);
    check_span("block_tables", g.block_tables, g.max_rows * g.max_blocks_per_row * 4, g.meta_slot_bytes, 4);
    check_span("context_lens", g.context_lens, g.max_rows * 4, g.meta_slot_bytes, 4);
    check_span("slot_mapping", g.slot_mapping, g.max_rows * 8, g.meta_slot_bytes, 8);
    if (g.staging_slot_bytes % kCacheLine != 0 || g.meta_slot_bytes % kCacheLine != 0) {
        fail("geometry", "slot strides must be multiples of 64 bytes");
    }
    return g;
}

std::unique_ptr<ServingLoop> start_loop(const py::array& kv, const py::array& staging, const py::array& meta,
                                        const py::array& doorbell, const py::dict& geometry_dict,
                                        const std::string& dtype, const std::optional<std::string>& isa,
                                        int num_threads, int64_t spin_us) {
    const DataPlaneGeometry g = geometry_from(geometry_dict, parse_dtype(dtype));
    if (spin_us < 0) fail("spin_us", "must be >= 0, got " + num(spin_us));
    const auto layers_bytes = static_cast<int64_t>(g.layer_bytes()) * g.num_layers;
    const DataPlaneRegions regions{
        region(kv, "kv", std::max(g.k_cache, g.v_cache) + layers_bytes),
        region(staging, "staging", g.num_slots * g.staging_slot_bytes),
        region(meta, "meta", g.num_slots * g.meta_slot_bytes),
        reinterpret_cast<Doorbell*>(region(doorbell, "doorbell", kDoorbellBytes)),
    };
    if (std::abs(g.k_cache - g.v_cache) < layers_bytes) fail("geometry[v_cache]", "overlaps k_cache");
    return std::make_unique<ServingLoop>(g, regions, parse_isa(isa), check_threads(num_threads), spin_us,
                                         kPrefetchDistance);
}

std::unique_ptr<DoorbellClient> make_client(const py::array& doorbell, uint32_t num_slots, uint32_t num_layers,
                                            int64_t spin_us) {
    if (num_slots < 1 || num_slots > kMaxSlots) fail("num_slots", "outside [1, " + num(kMaxSlots) + "]");
    if (spin_us < 0) fail("spin_us", "must be >= 0, got " + num(spin_us));
    auto* bell = reinterpret_cast<Doorbell*>(region(doorbell, "doorbell", kDoorbellBytes));
    return std::make_unique<DoorbellClient>(bell, num_slots, num_layers, spin_us);
}

py::dict doorbell_words() {
    py::dict words;
    words["magic"] = py::make_tuple(offsetof(Doorbell, magic), "uint32");
    words["ring_seq"] = py::make_tuple(offsetof(Doorbell, ring_seq), "uint32");
    words["done_seq"] = py::make_tuple(offsetof(Doorbell, done_seq), "uint32");
    words["server_sleeping"] = py::make_tuple(offsetof(Doorbell, server_sleeping), "uint32");
    words["client_waiting"] = py::make_tuple(offsetof(Doorbell, client_waiting), "uint32");
    words["server_pid"] = py::make_tuple(offsetof(Doorbell, server_pid), "uint32");
    words["state"] = py::make_tuple(offsetof(Doorbell, state), "uint32");
    words["stop"] = py::make_tuple(offsetof(Doorbell, stop), "uint32");
    for (uint32_t s = 0; s < kMaxSlots; ++s) {
        words[py::str("busy_ns." + std::to_string(s))] =
            py::make_tuple(offsetof(Doorbell, busy_ns) + s * sizeof(Word64), "uint64");
    }
    return words;
}

}  // namespace

void bind_serving(py::module_& m) {
    py::register_exception<DataPlaneError>(m, "DataPlaneError", PyExc_RuntimeError);
    m.attr("DOORBELL_BYTES") = kDoorbellBytes;
    m.attr("DOORBELL_MAX_SLOTS") = kMaxSlots;
    m.attr("DOORBELL_RING_ENTRIES") = kRingEntries;
    m.attr("DOORBELL_WORDS") = doorbell_words();

    py::class_<ServingLoop>(m, "ServingLoop",
                            "The data plane's serving thread: serves doorbell requests in seq order until stop().")
        .def(py::init(&start_loop), py::arg("kv").noconvert(), py::arg("staging").noconvert(),
             py::arg("meta").noconvert(), py::arg("doorbell").noconvert(), py::arg("geometry"), py::arg("dtype"),
             py::arg("isa") = py::none(), py::arg("num_threads") = 1, py::arg("spin_us") = 50,
             py::keep_alive<1, 2>(), py::keep_alive<1, 3>(), py::keep_alive<1, 4>(), py::keep_alive<1, 5>())
        .def("stop", &ServingLoop::stop, py::call_guard<py::gil_scoped_release>(),
             "Stops and joins the thread and marks the doorbell stopped; idempotent.");

    py::class_<DoorbellClient>(m, "DoorbellClient",
                               "The gpu_worker's side of the doorbell (one client per data plane).")
        .def(py::init(&make_client), py::arg("doorbell").noconvert(), py::arg("num_slots"), py::arg("num_layers"),
             py::arg("spin_us") = 50, py::keep_alive<1, 2>())
        .def("ring", &DoorbellClient::ring, py::arg("slot"), py::arg("layer"),
             "Publishes request {slot, layer} (its metadata and staging already written); returns its seq.")
        .def("wait", &DoorbellClient::wait, py::arg("seq"), py::arg("timeout_s"),
             py::call_guard<py::gil_scoped_release>(),
             "Blocks until request seq is served; DataPlaneError on timeout, a dead or stopped server, or a "
             "rejected request.")
        .def("busy_ns", &DoorbellClient::busy_ns, py::arg("slot"))
        .def("served_interval", &DoorbellClient::served_interval, py::arg("seq"),
             "(start_ns, end_ns) on CLOCK_MONOTONIC of a served request; valid until 8 more are rung.");
}

}  // namespace apex_serve::cpu_attention::bindings
