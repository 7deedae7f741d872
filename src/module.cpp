// pybind11 binding layer: array checks, dtype dispatch, GIL release, C++ errors -> Python.
// Parameters arrive already normalised by python/convfast/_spec.py; the checks here are the cheap
// re-checks that keep a wrong call from touching memory it should not.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <array>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "convfast/dispatch.hpp"
#include "convfast/engine.hpp"
#include "convfast/scratch.hpp"
#include "convfast/threads.hpp"
#include "convfast/weight_grad.hpp"

namespace py = pybind11;
using namespace convfast;

namespace {

using Triple = std::array<int64_t, kSpatialRank>;

// dtype equality (not identity: an unpickled array's descriptor is equal to, not the same object as,
// the builtin one).
bool same_dtype(const py::dtype& a, const py::dtype& b) {
  return a.is(b) || py::detail::npy_api::get().PyArray_EquivTypes_(a.ptr(), b.ptr());
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("convfast._core: " + msg);
}

std::vector<int64_t> element_strides(const py::array& a, const char* name) {
  std::vector<int64_t> s(a.ndim());
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    require(a.strides(i) % a.itemsize() == 0, std::string(name) + " strides must be whole elements");
    s[i] = a.strides(i) / a.itemsize();
  }
  return s;
}

template <typename T>
ConvProblem<T> make_problem(const py::array& x, const py::array& w, const py::object& bias, py::array& y, int kind,
                            const Triple& stride, const Triple& dilation, const Triple& pad_before, int mode) {
  require(x.ndim() == 5 && w.ndim() == 6 && y.ndim() == 5, "x, weight, y must be 5-D, 6-D, 5-D views");
  require(kind == 0 || kind == 1, "kind must be 0 (forward) or 1 (transposed)");
  require(mode >= 0 && mode <= 4, "bad padding mode");
  require(same_dtype(x.dtype(), w.dtype()) && same_dtype(x.dtype(), y.dtype()), "x, weight and y must share a dtype");
  require(y.writeable(), "y must be writeable");
  ConvProblem<T> p;
  p.kind = kind == 0 ? ConvKind::Forward : ConvKind::Transposed;
  p.mode = static_cast<PadMode>(mode);
  auto xs = element_strides(x, "x"), ws = element_strides(w, "weight"), ys = element_strides(y, "y");
  p.batch = x.shape(0);
  p.groups = w.shape(0);
  p.cout_per_group = w.shape(1);
  p.cin_per_group = w.shape(2);
  require(x.shape(1) == p.groups * p.cin_per_group, "x channels do not match the weight");
  require(y.shape(0) == p.batch && y.shape(1) == p.groups * p.cout_per_group, "y shape does not match");
  for (int a = 0; a < kSpatialRank; ++a) {
    p.in_size[a] = x.shape(2 + a);
    p.out_size[a] = y.shape(2 + a);
    p.kernel[a] = w.shape(3 + a);
    p.stride[a] = stride[a];
    p.dilation[a] = dilation[a];
    p.pad_before[a] = pad_before[a];
    p.x_stride[a] = xs[2 + a];
    p.w_stride[a] = ws[3 + a];
    p.y_stride[a] = ys[2 + a];
  }
  p.x = static_cast<const T*>(x.data());
  p.x_stride_n = xs[0];
  p.x_stride_c = xs[1];
  p.w = static_cast<const T*>(w.data());
  p.w_stride_g = ws[0];
  p.w_stride_co = ws[1];
  p.w_stride_ci = ws[2];
  p.y = static_cast<T*>(y.mutable_data());
  p.y_stride_n = ys[0];
  p.y_stride_c = ys[1];
  if (!bias.is_none()) {
    py::array b = bias.cast<py::array>();
    require(b.ndim() == 1 && b.shape(0) == y.shape(1) && same_dtype(b.dtype(), y.dtype()), "bias must be (C_out,) of y's dtype");
    p.bias = static_cast<const T*>(b.data());
    p.bias_stride = element_strides(b, "bias")[0];
  }
  return p;
}

bool is_f32(const py::array& a) { return same_dtype(a.dtype(), py::dtype::of<float>()); }
bool is_f64(const py::array& a) { return same_dtype(a.dtype(), py::dtype::of<double>()); }

void conv(const py::array& x, const py::array& w, const py::object& bias, py::array y, int kind,
          const Triple& stride, const Triple& dilation, const Triple& pad_before, int mode) {
  if (is_f32(x)) {
    auto p = make_problem<float>(x, w, bias, y, kind, stride, dilation, pad_before, mode);
    py::gil_scoped_release release;
    run_convolution(p);
  } else if (is_f64(x)) {
    auto p = make_problem<double>(x, w, bias, y, kind, stride, dilation, pad_before, mode);
    py::gil_scoped_release release;
    run_convolution(p);
  } else {
    throw py::type_error("convfast._core: only float32 and float64 are computed natively");
  }
}

// A planned convolution with its weights packed once (used by the layer objects).
class Plan {
 public:
  Plan(const py::array& x, const py::array& w, py::array y, int kind, const Triple& stride, const Triple& dilation,
       const Triple& pad_before, int mode)
      : kind_(kind), stride_(stride), dilation_(dilation), pad_before_(pad_before), mode_(mode),
        w_shape_(w.shape(), w.shape() + w.ndim()) {
    if (is_f32(x)) {
      auto p = make_problem<float>(x, w, py::none(), y, kind, stride, dilation, pad_before, mode);
      py::gil_scoped_release release;
      f32_ = std::make_shared<ConvPlan<float>>(p);
    } else if (is_f64(x)) {
      auto p = make_problem<double>(x, w, py::none(), y, kind, stride, dilation, pad_before, mode);
      py::gil_scoped_release release;
      f64_ = std::make_shared<ConvPlan<double>>(p);
    } else {
      throw py::type_error("convfast._core: only float32 and float64 are computed natively");
    }
  }

  // w only describes the weight's shape here: its values were packed when the plan was made.
  void execute(const py::array& x, const py::array& w, const py::object& bias, py::array y) const {
    require(std::vector<py::ssize_t>(w.shape(), w.shape() + w.ndim()) == w_shape_, "weight shape differs from the plan");
    if (f32_) {
      require(is_f32(x), "this plan is float32");
      auto p = make_problem<float>(x, w, bias, y, kind_, stride_, dilation_, pad_before_, mode_);
      py::gil_scoped_release release;
      f32_->execute(p);
    } else {
      require(is_f64(x), "this plan is float64");
      auto p = make_problem<double>(x, w, bias, y, kind_, stride_, dilation_, pad_before_, mode_);
      py::gil_scoped_release release;
      f64_->execute(p);
    }
  }

  std::string describe() const { return f32_ ? f32_->describe() : f64_->describe(); }

 private:
  int kind_;
  Triple stride_, dilation_, pad_before_;
  int mode_;
  std::vector<py::ssize_t> w_shape_;
  std::shared_ptr<ConvPlan<float>> f32_;
  std::shared_ptr<ConvPlan<double>> f64_;
};

py::array output_array(const std::vector<py::ssize_t>& shape, const py::dtype& dtype);

// One distinct call signature, checked once: python/convfast/functional.py builds a Call after the
// first call with given shapes, strides, dtypes and parameters has gone through the full
// normalisation (_spec.py), and later calls with the same signature hand over only their arrays.
// It keeps the kernels' problem (the rank-3 views' sizes and element strides, as byte offsets from
// the operands' data pointers), the operands' expected geometry, and for layers a plan with the
// weights packed. run() re-checks the geometry (a mismatch returns None: the caller takes the full
// path), allocates the output and runs the engine: about 3 us of fixed cost where the full path
// spends 30-40 us normalising in Python.
class Call {
 public:
  Call(const py::array& x5, const py::array& w6, py::array y5, int kind, const Triple& stride,
       const Triple& dilation, const Triple& pad_before, int mode, const py::array& x, const py::array& w,
       const py::object& bias, const py::array& y, bool planned, const std::string& algorithm)
      : dtype_(y.dtype()), f64_(is_f64(x5)), planned_(planned),
        x_(x), w_(w), y_shape_(y.shape(), y.shape() + y.ndim()) {
    require(is_f32(x5) || f64_, "only float32 and float64 are computed natively");
    require(same_dtype(x.dtype(), dtype_) && same_dtype(w.dtype(), dtype_), "x and weight must have the output's dtype");
    require(y.flags() & py::array::c_style, "y must be C-contiguous");
    x_offset_ = byte_offset(x5, x);
    w_offset_ = byte_offset(w6, w);
    y_offset_ = byte_offset(y5, y);
    if (!bias.is_none()) {
      py::array b = bias.cast<py::array>();
      require(same_dtype(b.dtype(), dtype_), "bias must have the output's dtype");
      bias_.emplace(b);
    }
    require(algorithm.empty() || planned, "a forced algorithm needs a planned Call");
    if (f64_) {
      f64_problem_ = make_problem<double>(x5, w6, bias, y5, kind, stride, dilation, pad_before, mode);
      if (planned) {
        py::gil_scoped_release release;
        const AlgorithmOverride forced(algorithm.empty() ? nullptr : algorithm.c_str());
        const KeptPlanScope kept;
        f64_plan_ = std::make_shared<ConvPlan<double>>(f64_problem_);
      }
    } else {
      f32_problem_ = make_problem<float>(x5, w6, bias, y5, kind, stride, dilation, pad_before, mode);
      if (planned) {
        py::gil_scoped_release release;
        const AlgorithmOverride forced(algorithm.empty() ? nullptr : algorithm.c_str());
        const KeptPlanScope kept;
        f32_plan_ = std::make_shared<ConvPlan<float>>(f32_problem_);
      }
    }
  }

  // y for these operands, or None where they do not match the signature (the caller then takes
  // the full path).
  py::object run(const py::array& x, const py::array& w, const py::object& bias) const {
    if (!x_.matches(x) || !w_.matches(w)) return py::none();
    const py::array* b = nullptr;
    py::array bias_array;
    if (bias.is_none() != !bias_.has_value()) return py::none();
    if (!bias.is_none()) {
      if (!py::isinstance<py::array>(bias)) return py::none();
      bias_array = py::reinterpret_borrow<py::array>(bias);
      if (!bias_->matches(bias_array)) return py::none();
      b = &bias_array;
    }
    py::array y = output_array(y_shape_, dtype_);
    if (f64_)
      launch<double>(f64_problem_, f64_plan_, x, w, b, y);
    else
      launch<float>(f32_problem_, f32_plan_, x, w, b, y);
    return std::move(y);
  }

  std::string describe() const {
    if (f64_plan_) return f64_plan_->describe();
    if (f32_plan_) return f32_plan_->describe();
    return last_algorithm();
  }

 private:
  // An operand's shape, byte strides and dtype as seen when the Call was built.
  struct Geometry {
    std::vector<py::ssize_t> shape, strides;
    py::dtype dtype;
    explicit Geometry(const py::array& a)
        : shape(a.shape(), a.shape() + a.ndim()), strides(a.strides(), a.strides() + a.ndim()), dtype(a.dtype()) {}
    bool matches(const py::array& a) const {
      const py::ssize_t n = a.ndim();
      if (n != static_cast<py::ssize_t>(shape.size()) || !std::equal(shape.begin(), shape.end(), a.shape()) ||
          !std::equal(strides.begin(), strides.end(), a.strides()) || !same_dtype(a.dtype(), dtype))
        return false;
      return reinterpret_cast<uintptr_t>(a.data()) % static_cast<uintptr_t>(a.itemsize()) == 0;
    }
  };

  static py::ssize_t byte_offset(const py::array& view, const py::array& base) {
    return static_cast<const char*>(view.data()) - static_cast<const char*>(base.data());
  }

  template <typename T>
  void launch(const ConvProblem<T>& shape, const std::shared_ptr<ConvPlan<T>>& plan, const py::array& x,
              const py::array& w, const py::array* b, py::array& y) const {
    ConvProblem<T> p = shape;
    p.x = reinterpret_cast<const T*>(static_cast<const char*>(x.data()) + x_offset_);
    p.w = reinterpret_cast<const T*>(static_cast<const char*>(w.data()) + w_offset_);
    p.y = reinterpret_cast<T*>(static_cast<char*>(y.mutable_data()) + y_offset_);
    p.bias = b ? static_cast<const T*>(b->data()) : nullptr;
    p.bias_stride = b ? b->strides(0) / static_cast<py::ssize_t>(sizeof(T)) : 0;
    py::gil_scoped_release release;
    if (plan)
      plan->execute(p);
    else
      run_convolution(p);
  }

  py::dtype dtype_;
  bool f64_, planned_;
  Geometry x_, w_;
  std::optional<Geometry> bias_;
  std::vector<py::ssize_t> y_shape_;
  py::ssize_t x_offset_ = 0, w_offset_ = 0, y_offset_ = 0;
  ConvProblem<float> f32_problem_;
  ConvProblem<double> f64_problem_;
  std::shared_ptr<ConvPlan<float>> f32_plan_;
  std::shared_ptr<ConvPlan<double>> f64_plan_;
};

template <typename T>
void weight_grad_typed(const py::array& a, const py::array& b, py::array& out, int64_t groups, const Triple& kernel,
                       const Triple& stride, const Triple& dilation, const Triple& pad_before, int mode) {
  WeightGradProblem<T> p;
  auto as = element_strides(a, "a"), bs = element_strides(b, "b");
  p.batch = a.shape(0);
  p.groups = groups;
  p.a_channels = a.shape(1);
  p.b_channels = b.shape(1);
  p.mode = static_cast<PadMode>(mode);
  for (int i = 0; i < kSpatialRank; ++i) {
    p.a_size[i] = a.shape(2 + i);
    p.b_size[i] = b.shape(2 + i);
    p.kernel[i] = kernel[i];
    p.stride[i] = stride[i];
    p.dilation[i] = dilation[i];
    p.pad_before[i] = pad_before[i];
    p.a_stride[i] = as[2 + i];
    p.b_stride[i] = bs[2 + i];
  }
  p.a = static_cast<const T*>(a.data());
  p.a_stride_n = as[0];
  p.a_stride_c = as[1];
  p.b = static_cast<const T*>(b.data());
  p.b_stride_n = bs[0];
  p.b_stride_c = bs[1];
  p.out = static_cast<T*>(out.mutable_data());
  py::gil_scoped_release release;
  weight_grad(p);
}

// out[cb, ca, t] = sum_{n, o} a[n, G(cb) * Ca_g + ca, t * dilation + o * stride - pad_before] * b[n, cb, o], a read
// through the padding mode: the weight gradient (python/convfast/backward.py::_weight_grad).
void weight_grad_binding(const py::array& a, const py::array& b, py::array out, int64_t groups, const Triple& kernel,
                         const Triple& stride, const Triple& dilation, const Triple& pad_before, int mode) {
  require(a.ndim() == 5 && b.ndim() == 5 && out.ndim() == 5, "a, b, out must be 5-D views");
  require(same_dtype(a.dtype(), b.dtype()) && same_dtype(a.dtype(), out.dtype()), "a, b and out must share a dtype");
  require(mode >= 0 && mode <= 4, "bad padding mode");
  require(groups >= 1 && a.shape(1) % groups == 0 && b.shape(1) % groups == 0,
          "groups must divide the channels of a and b");
  require(a.shape(0) == b.shape(0), "a and b must have the same batch size");
  require(out.writeable(), "out must be writeable");
  require(out.shape(0) == b.shape(1) && out.shape(1) == a.shape(1) / groups, "out must be (Cb, Ca / groups, *kernel)");
  int64_t expect = out.itemsize();
  for (int i = 4; i >= 0; --i) {
    if (i >= 2) require(out.shape(i) == kernel[i - 2], "out's spatial shape must be the kernel");
    require(out.shape(i) <= 1 || out.strides(i) == expect, "out must be C-contiguous");
    expect *= out.shape(i);
  }
  if (is_f32(a))
    weight_grad_typed<float>(a, b, out, groups, kernel, stride, dilation, pad_before, mode);
  else if (is_f64(a))
    weight_grad_typed<double>(a, b, out, groups, kernel, stride, dilation, pad_before, mode);
  else
    throw py::type_error("convfast._core: only float32 and float64 are computed natively");
}

void pad(const py::array& src, py::array dst, const std::vector<int64_t>& before, const std::vector<int64_t>& after,
         bool constant, int mode, const py::bytes& fill) {
  PadRequest r;
  r.ndim = static_cast<int>(src.ndim());
  r.itemsize = src.itemsize();
  require(r.itemsize == 1 || r.itemsize == 2 || r.itemsize == 4 || r.itemsize == 8 || r.itemsize == 16,
          "pad supports item sizes 1, 2, 4, 8, 16");
  require((int)before.size() == r.ndim && (int)after.size() == r.ndim, "pad widths must match ndim");
  require(dst.ndim() == src.ndim() && dst.itemsize() == src.itemsize() && dst.writeable(), "bad pad output");
  require(mode >= 0 && mode <= 4, "bad padding mode");
  const std::string fill_bytes = fill;
  if (constant) require((int64_t)fill_bytes.size() == 2 * r.ndim * r.itemsize, "fill must hold 2*ndim items");
  int64_t expect = r.itemsize;
  for (int a = r.ndim - 1; a >= 0; --a) {
    require(before[a] >= 0 && after[a] >= 0, "pad widths must be non-negative");
    int64_t padded;
    require(!__builtin_add_overflow((int64_t)src.shape(a), before[a], &padded) &&
                !__builtin_add_overflow(padded, after[a], &padded) && dst.shape(a) == padded,
            "bad pad output shape");
    require(dst.shape(a) <= 1 || dst.strides(a) == expect, "pad output must be C-contiguous");
    expect *= dst.shape(a);
  }
  r.src = static_cast<const char*>(src.data());
  r.dst = static_cast<char*>(dst.mutable_data());
  for (int a = 0; a < r.ndim; ++a) {
    r.shape.push_back(src.shape(a));
    r.src_stride_bytes.push_back(src.strides(a));
  }
  r.pad_before = before;
  r.pad_after = after;
  r.constant = constant;
  r.mode = static_cast<PadMode>(mode);
  r.fill = fill_bytes.data();
  py::gil_scoped_release release;
  run_pad(r);
}

// An uninitialised C-contiguous array for an output the kernels write whole. Below
// kLargeBlockMin bytes it is NumPy's own; larger ones are large blocks (scratch.hpp), which go back
// to the kept blocks when the array is freed, so that the next call's output of the same size
// reuses them: NumPy maps fresh pages for every large array, and the kernel's zeroing of them
// (clear_page) was 6 % of the layer suite's float64 backward profile and 16 % of a 1x1 layer's
// grad_input (a 51 MB output).
py::array output_array(const std::vector<py::ssize_t>& shape, const py::dtype& dtype) {
  int64_t bytes = dtype.itemsize();
  for (py::ssize_t d : shape) {
    require(d >= 0, "output_array: negative extent");
    bytes = detail::checked_mul(bytes, d);
  }
  if (bytes < detail::kLargeBlockMin) return py::array(dtype, shape);
  struct Owned {
    void* ptr;
    size_t bytes;
  };
  size_t size = static_cast<size_t>(bytes);
  void* ptr = detail::take_large_block(size);
  py::capsule owner(new Owned{ptr, size}, [](void* o) {
    const Owned* block = static_cast<const Owned*>(o);
    detail::release_large_block(block->ptr, block->bytes);
    delete block;
  });
  return py::array(dtype, shape, ptr, owner);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "convfast compiled kernels (use the convfast package, not this module directly)";
  py::register_exception_translator([](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const std::length_error& err) {
      PyErr_SetString(PyExc_MemoryError, err.what());
    }
  });
  m.def("conv", &conv, py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("kind"),
        py::arg("stride"), py::arg("dilation"), py::arg("pad_before"), py::arg("mode"));
  py::class_<Plan>(m, "Plan")
      .def(py::init<const py::array&, const py::array&, py::array, int, const Triple&, const Triple&, const Triple&,
                    int>(),
           py::arg("x"), py::arg("w"), py::arg("y"), py::arg("kind"), py::arg("stride"), py::arg("dilation"),
           py::arg("pad_before"), py::arg("mode"))
      .def("execute", &Plan::execute, py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"))
      .def("describe", &Plan::describe);
  py::class_<Call>(m, "Call")
      .def(py::init<const py::array&, const py::array&, py::array, int, const Triple&, const Triple&, const Triple&,
                    int, const py::array&, const py::array&, const py::object&, const py::array&, bool,
                    const std::string&>(),
           py::arg("x5"), py::arg("w6"), py::arg("y5"), py::arg("kind"), py::arg("stride"), py::arg("dilation"),
           py::arg("pad_before"), py::arg("mode"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"),
           py::arg("planned"), py::arg("algorithm") = std::string())
      .def("run", &Call::run, py::arg("x"), py::arg("w"), py::arg("bias"))
      .def("describe", &Call::describe);
  m.def("weight_grad", &weight_grad_binding, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("groups"),
        py::arg("kernel"), py::arg("stride"), py::arg("dilation"), py::arg("pad_before"), py::arg("mode"));
  m.def("pad", &pad);
  m.def("output_array", &output_array, py::arg("shape"), py::arg("dtype"));
  m.def("set_num_threads", &set_num_threads);
  m.def("get_num_threads", &get_num_threads);
  // The thread count of each call (cpp/include/convfast/threads.hpp).
  m.def("last_call_threads", &last_call_threads);
  m.def("set_min_work_per_thread", &set_min_work_per_thread, py::arg("multiply_adds"));
  m.def("min_work_per_thread", &min_work_per_thread);
  m.def("threads_in_flight", &threads_in_flight);
  m.def("hold_threads", &hold_threads, py::arg("n"));
  m.def("serial_after_fork", &serial_after_fork);
  m.def("supported_isas", &supported_isas);
  m.def("select_isa", &select_isa);
  m.def("active_isa", []() { return std::string(active_ukernels().isa); });
  m.def("ukernel_tiles", []() {
    const UkernelSet& s = active_ukernels();
    return py::make_tuple(py::make_tuple(s.f32.mr, s.f32.nr), py::make_tuple(s.f64.mr, s.f64.nr));
  });
  m.def("last_algorithm", &last_algorithm);
  m.def("ukernel_peak_gflops", &ukernel_peak_gflops, py::arg("f64"), py::arg("seconds"),
        py::call_guard<py::gil_scoped_release>());
  m.attr("openmp_version") = py::int_(_OPENMP);
}
