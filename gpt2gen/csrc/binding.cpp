// binding.cpp — the Python module every generated model links against (pybind11).
//
// It knows nothing about any model: it calls the functions of gpt2gen_abi.h, which the generated
// model.o supplies at link time. So it is compiled once per compiler and Python, and a model edit
// only recompiles the generated C and relinks. Arenas are numpy arrays owned by Python; every call
// checks their sizes and dtypes and releases the GIL while the model computes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "gpt2gen_abi.h"

namespace py = pybind11;

using FloatArray = py::array_t<float, py::array::c_style>;
using IntArray = py::array_t<int, py::array::c_style>;

namespace {

float* arena_ptr(FloatArray& a, size_t need, const char* what) {
    if (a.ndim() != 1 || static_cast<size_t>(a.size()) < need) {
        throw std::invalid_argument(std::string("arena '") + what + "' must be a 1-D float32 array of at least " +
                                    std::to_string(need) + " elements");
    }
    if (!a.writeable()) throw std::invalid_argument(std::string("arena '") + what + "' is read-only");
    return a.mutable_data();
}

// Holds the six arenas (and references to their arrays, so they outlive every call).
struct Arenas {
    FloatArray params, grads, m, v, acts, dacts;
    gg_arenas raw{};

    Arenas(FloatArray p, FloatArray g, FloatArray m_, FloatArray v_, FloatArray a, FloatArray da)
        : params(p), grads(g), m(m_), v(v_), acts(a), dacts(da) {
        size_t np = gg_arena_floats(0), na = gg_arena_floats(1), nd = gg_arena_floats(2);
        raw.params = arena_ptr(params, np, "params");
        raw.grads = arena_ptr(grads, np, "grads");
        raw.m = arena_ptr(m, np, "m");
        raw.v = arena_ptr(v, np, "v");
        raw.acts = arena_ptr(acts, na, "acts");
        raw.dacts = arena_ptr(dacts, nd, "dacts");
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

}  // namespace

PYBIND11_MODULE(_gpt2gen_model, mod) {
    mod.doc() = "A gpt2gen model compiled from generated sources (see gpt2gen.runtime.Model).";
    mod.def("signature", []() { return std::string(gg_signature()); });
    mod.def("arena_floats", [](int which) { return gg_arena_floats(which); });
    mod.def("num_inputs", []() { return gg_num_inputs(); });

    py::class_<Arenas>(mod, "Arenas", py::module_local())
        .def(py::init<FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray>());

    mod.def("forward", [](Arenas& ar, const py::list& inputs, int B, int T) {
        std::vector<IntArray> keep;
        auto ptrs = input_ptrs(inputs, keep, B, T);
        py::gil_scoped_release nogil;
        return gg_forward(&ar.raw, ptrs.data(), B, T);
    });
    mod.def("backward", [](Arenas& ar, const py::list& inputs, int B, int T) {
        std::vector<IntArray> keep;
        auto ptrs = input_ptrs(inputs, keep, B, T);
        py::gil_scoped_release nogil;
        gg_backward(&ar.raw, ptrs.data(), B, T);
    });
    mod.def("zero_grad", [](Arenas& ar) {
        py::gil_scoped_release nogil;
        gg_zero_grad(&ar.raw);
    });
    mod.def("update", [](Arenas& ar, float lr, float beta1, float beta2, float eps, float weight_decay, int step,
                         float grad_scale) {
        py::gil_scoped_release nogil;
        gg_update(&ar.raw, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
    });
}
