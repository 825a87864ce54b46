// fastagg._cpu: the C++ CPU kernels as Python functions (fastagg/cpu_cpp.py calls them with
// tensors' data pointers). Only this file sees pybind11; every kernel runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "fastagg_cpu.h"

namespace py = pybind11;
using namespace fastagg;

// groups_in: (rows' data pointer, dtype code, elements between rows, coefs, row indices) each
static void fused_merge_py(uintptr_t theta_ptr, uintptr_t out_ptr, int64_t P, double c0,
                           const std::vector<py::tuple>& groups_in) {
    std::vector<Group> groups;
    for (const auto& t : groups_in) {
        Group g;
        g.base = reinterpret_cast<const char*>(t[0].cast<uintptr_t>());
        g.dtype = t[1].cast<int>();
        check_dtype(g.dtype);
        g.stride = t[2].cast<int64_t>();
        g.coefs = t[3].cast<std::vector<float>>();
        g.rows = t[4].cast<std::vector<int64_t>>();
        if (g.coefs.size() != g.rows.size()) throw std::invalid_argument("coefs and rows differ in length");
        groups.push_back(std::move(g));
    }
    py::gil_scoped_release release;
    fused_merge(reinterpret_cast<const float*>(theta_ptr), reinterpret_cast<float*>(out_ptr), P, c0, groups);
}

static int num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "fastagg C++ CPU kernels (no torch headers; raw pointers)";
    // the GIL released for the whole call; an error raised inside takes it back before it is raised in Python
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("fused_merge", &fused_merge_py, "out = c0*theta + sum coef*row over row groups (ptr, dtype, stride, coefs, rows)");
    m.def("kd_loss_grad", &kd_loss_grad, nogil, "row losses and logit gradient of the KD loss");
    m.def("stage_row", &stage_row, nogil, "dst = src converted to dst's dtype; returns the sum of squares of dst (double)");
    m.def("head_stats", &head_stats, nogil, "fold a chunk of logits into the rows' running max, sum of exp and sum p z / T");
    m.def("head_grad", &head_grad, nogil, "a chunk's logit gradient over its logits, and its column sums into db");
    m.def("num_threads", &num_threads);
    // the calling convention's version (fastagg/cpu_cpp.py checks it): 2 since kd_loss_grad takes
    // the temperature instead of its inverse (a stale build would compute with the wrong scale), 3
    // since head_stats and head_grad (a stale build lacks them)
    m.attr("abi") = 3;
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
