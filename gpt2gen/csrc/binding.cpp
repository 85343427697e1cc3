// binding.cpp — the Python module every generated model links against (pybind11).
//
// It knows nothing about any model: it calls the functions of gpt2gen_abi.h, which the generated
// model.o supplies at link time. So it is compiled once per compiler and Python, and a model edit
// only recompiles the generated C and relinks. Arenas are numpy arrays owned by Python, of whatever
// element type the model's precision stores (the runtime makes them); the binding checks that each is
// contiguous, writeable and large enough in bytes, and releases the GIL while the model computes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "gpt2gen_abi.h"

namespace py = pybind11;

using IntArray = py::array_t<int, py::array::c_style>;

namespace {

void* arena_ptr(py::array& a, size_t need, const char* what) {
    if (!(a.flags() & py::array::c_style) || a.ndim() != 1 || static_cast<size_t>(a.nbytes()) < need) {
        throw std::invalid_argument(std::string("arena '") + what + "' must be a contiguous 1-D array of at least " +
                                    std::to_string(need) + " bytes");
    }
    if (!a.writeable()) throw std::invalid_argument(std::string("arena '") + what + "' is read-only");
    return a.mutable_data();
}

// Holds the arenas (and references to their arrays, so they outlive every call). master is None where the
// model has no master weights (fp32).
struct Arenas {
    py::array params, grads, m, v, acts, dacts;
    py::object master, cache;
    gg_arenas raw{};

    Arenas(py::array p, py::array g, py::object master_, py::array m_, py::array v_, py::array a, py::array da,
           py::object kv)
        : params(p), grads(g), m(m_), v(v_), acts(a), dacts(da), cache(kv), master(master_) {
        size_t np = gg_arena_bytes(GG_ARENA_PARAMS), nm = gg_arena_bytes(GG_ARENA_MOMENTS);
        raw.params = arena_ptr(params, np, "params");
        raw.grads = arena_ptr(grads, np, "grads");
        raw.m = arena_ptr(m, nm, "m");
        raw.v = arena_ptr(v, nm, "v");
        raw.acts = arena_ptr(acts, gg_arena_bytes(GG_ARENA_ACTS), "acts");
        raw.dacts = arena_ptr(dacts, gg_arena_bytes(GG_ARENA_DACTS), "dacts");
        if (!cache.is_none()) {   // None until the first decode (training never needs it)
            py::array arr = py::cast<py::array>(cache);
            raw.cache = arena_ptr(arr, gg_arena_bytes(GG_ARENA_CACHE), "cache");
        }
        size_t nmaster = gg_arena_bytes(GG_ARENA_MASTER);
        if (nmaster == 0 && !master.is_none()) throw std::invalid_argument("this model has no master weights");
        if (nmaster != 0) {
            if (master.is_none()) throw std::invalid_argument("arena 'master' is missing");
            py::array arr = py::cast<py::array>(master);
            raw.master = arena_ptr(arr, nmaster, "master");
        }
    }
};

// The inputs as C pointers; None stays NULL. Shapes and ranges are checked by the Python runtime.
std::vector<const int*> input_ptrs(const py::list& inputs, std::vector<IntArray>& keep, int B, int T) {
    if (static_cast<int>(inputs.size()) != gg_num_inputs()) {
        throw std::invalid_argument("expected " + std::to_string(gg_num_inputs()) + " inputs");
    }
    std::vector<const int*> ptrs;
    for (auto item : inputs) {
        if (item.is_none()) {
            ptrs.push_back(nullptr);
            continue;
        }
        IntArray arr = py::cast<IntArray>(item);
        if (arr.size() < static_cast<py::ssize_t>(B) * T) throw std::invalid_argument("an input is smaller than B*T");
        keep.push_back(arr);
        ptrs.push_back(arr.data());
    }
    return ptrs;
}

// After a call: what the model recorded as failing (gg_error), raised as a RuntimeError.
void raise_recorded() {
    const char* e = gg_error();
    if (e) throw std::runtime_error(std::string("the model failed: ") + e);
}

}  // namespace

PYBIND11_MODULE(_gpt2gen_model, mod) {
    mod.doc() = "A gpt2gen model compiled from generated sources (see gpt2gen.runtime.Model).";
    mod.def("signature", []() { return std::string(gg_signature()); });
    mod.def("arena_bytes", [](int which) { return gg_arena_bytes(which); });
    mod.def("num_inputs", []() { return gg_num_inputs(); });

    py::class_<Arenas>(mod, "Arenas", py::module_local())
        .def(py::init<py::array, py::array, py::object, py::array, py::array, py::array, py::array, py::object>());
    mod.def("decode_positions", []() { return gg_decode_positions(); });

    mod.def("forward", [](Arenas& ar, const py::list& inputs, int B, int T) {
        std::vector<IntArray> keep;
        auto ptrs = input_ptrs(inputs, keep, B, T);
        float loss;
        {
            py::gil_scoped_release nogil;
            loss = gg_forward(&ar.raw, ptrs.data(), B, T);
        }
        raise_recorded();
        return loss;
    });
    mod.def("decode", [](Arenas& ar, const py::list& inputs, int T, int pos0) {
        if (T < 1 || pos0 < 0 || pos0 + T > gg_decode_positions()) {
            throw std::invalid_argument("decode positions " + std::to_string(pos0) + ".." + std::to_string(pos0 + T) +
                                        " outside the cache's " + std::to_string(gg_decode_positions()));
        }
        if (!ar.raw.cache && gg_arena_bytes(GG_ARENA_CACHE) != 0) throw std::invalid_argument("arena 'cache' is missing");
        std::vector<IntArray> keep;
        auto ptrs = input_ptrs(inputs, keep, 1, T);
        {
            py::gil_scoped_release nogil;
            gg_decode(&ar.raw, ptrs.data(), T, pos0);
        }
        raise_recorded();
    });
    mod.def("backward", [](Arenas& ar, const py::list& inputs, int B, int T, float loss_scale) {
        std::vector<IntArray> keep;
        auto ptrs = input_ptrs(inputs, keep, B, T);
        {
            py::gil_scoped_release nogil;
            gg_backward(&ar.raw, ptrs.data(), B, T, loss_scale);
        }
        raise_recorded();
    });
    mod.def("zero_grad", [](Arenas& ar) {
        {
            py::gil_scoped_release nogil;
            gg_zero_grad(&ar.raw);
        }
        raise_recorded();
    });
    mod.def("update", [](Arenas& ar, float lr, float beta1, float beta2, float eps, float weight_decay, int step,
                         float grad_scale) {
        int taken;
        {
            py::gil_scoped_release nogil;
            taken = gg_update(&ar.raw, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
        }
        raise_recorded();
        return taken != 0;
    });
}
