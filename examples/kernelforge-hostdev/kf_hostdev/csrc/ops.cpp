// The aten kernels of hostdev, and the fallback that runs every other aten
// op on the CPU kernels.
//
// hostdev memory is host memory, so an op runs on CPU tensors that alias
// the device tensors' bytes (no copy): in-place and out= results land in
// device memory directly, views of inputs come back as views of the device
// storages, and fresh CPU results become device tensors that keep the CPU
// storage alive (again no copy).

#include "hostdev.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/ops/_local_scalar_dense_native.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/unfold_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace kf_hostdev {
namespace {

constexpr c10::DispatchKeySet kDeviceKeys(c10::DispatchKey::PrivateUse1);
constexpr c10::DispatchKeySet kCpuKeys(c10::DispatchKey::CPU);

bool on_device(const at::Tensor& t) {
  return t.defined() && t.device().is_privateuseone();
}

void check_device(std::optional<c10::Device> d) {
  if (d.has_value()) {
    TORCH_CHECK(d->is_privateuseone(), "hostdev: expected a hostdev device, got ", *d);
    check_index(d->index());
  }
}

// A tensor whose elements lie outside its storage would make a kernel read
// or write past the memory: refuse it instead of crashing.
void check_in_storage(const at::Tensor& t, const c10::Storage& storage, const char* what) {
  if (t.numel() == 0) {
    return;
  }
  int64_t last = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  const auto need = static_cast<size_t>(last + 1) * t.dtype().itemsize();
  TORCH_CHECK(t.storage_offset() >= 0 && need <= storage.nbytes(), "hostdev: ", what,
              " needs ", need, " bytes of its storage, which holds ", storage.nbytes());
}

at::Tensor with_storage(c10::Storage storage, c10::DispatchKeySet keys, const at::Tensor& like) {
  check_in_storage(like, storage, "a tensor");
  auto t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), keys, like.dtype());
  t.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides(),
                                                 like.storage_offset());
  if (like.is_conj()) {
    t._set_conj(true);
  }
  if (like.is_neg()) {
    t._set_neg(true);
  }
  return t;
}

// A device storage holding the bytes of a CPU storage. Zero-copy when
// nobody else holds the CPU storage (the device storage keeps it alive),
// else a copy: someone could resize it and free the bytes under us.
struct KeepAlive {
  c10::Storage cpu;
  size_t nbytes;
};

void release_keep_alive(void* ctx) {
  auto* keep = static_cast<KeepAlive*>(ctx);
  track_adopted(keep->nbytes, -1);
  delete keep;
}

c10::Storage adopt(const c10::Storage& cpu, bool exclusive) {
  const size_t nbytes = cpu.nbytes();
  if (nbytes == 0 || cpu.data() == nullptr) {
    return c10::Storage(c10::Storage::use_byte_size_t(), 0, allocator(), true);
  }
  if (exclusive) {
    void* data = cpu.unsafeGetStorageImpl()->mutable_data();
    c10::DataPtr ptr(data, new KeepAlive{cpu, nbytes}, &release_keep_alive, device());
    track_adopted(nbytes, +1);
    return c10::Storage(c10::Storage::use_byte_size_t(), nbytes, std::move(ptr), allocator(),
                        true);
  }
  c10::DataPtr ptr = allocator()->allocate(nbytes);
  std::memcpy(ptr.get(), cpu.data(), nbytes);
  return c10::Storage(c10::Storage::use_byte_size_t(), nbytes, std::move(ptr), allocator(), true);
}

// CPU tensors aliasing device tensors for the length of one op. Each device
// storage maps to one CPU storage (and each device tensor to one CPU
// tensor), so the CPU kernels see the same aliasing as on the device: their
// overlap checks and in-place semantics hold.
class HostViews {
 public:
  at::Tensor to_cpu(const at::Tensor& t) {
    if (!on_device(t)) {
      return t;
    }
    auto* impl = t.unsafeGetTensorImpl();
    auto hit = tensors_.find(impl);
    if (hit != tensors_.end()) {
      return hit->second;
    }
    at::Tensor cpu = with_storage(cpu_storage(t.storage()), kCpuKeys, t);
    tensors_.emplace(impl, cpu);
    device_of_tensor_.emplace(cpu.unsafeGetTensorImpl(), t);
    return cpu;
  }

  // After the CPU kernel ran: a CPU storage it grew (an out= argument too
  // small) now holds its bytes elsewhere; move them into device memory.
  void sync_grown_storages() {
    for (auto& [cpu_impl, entry] : storages_) {
      if (entry.cpu.data() == entry.data && entry.cpu.nbytes() == entry.nbytes) {
        continue;
      }
      auto* dev = entry.device.unsafeGetStorageImpl();
      TORCH_CHECK(dev->resizable(), "hostdev: trying to resize a storage that is not resizable");
      const size_t nbytes = entry.cpu.nbytes();
      c10::DataPtr ptr = allocator()->allocate(nbytes);
      if (nbytes > 0) {
        std::memcpy(ptr.get(), entry.cpu.data(), nbytes);
      }
      dev->set_data_ptr_noswap(std::move(ptr));
      dev->set_nbytes(nbytes);
    }
  }

  // The device tensor for a CPU result: the argument it is (in-place and
  // out= ops return their argument), a view of a device storage, or a
  // fresh result adopted as a device tensor. `exclusive`: the CPU
  // storages only results hold (safe to adopt without a copy).
  at::Tensor to_device(const at::Tensor& cpu, const std::unordered_set<c10::StorageImpl*>& exclusive) {
    if (!cpu.defined() || cpu.device().type() != c10::DeviceType::CPU) {
      return cpu;
    }
    auto same = device_of_tensor_.find(cpu.unsafeGetTensorImpl());
    if (same != device_of_tensor_.end()) {
      return same->second;
    }
    if (cpu._is_zerotensor()) {
      // a ZeroTensor has no memory behind its elements: hostdev holds real zeros
      at::Tensor zeros = at::detail::empty_generic(cpu.sizes(), allocator(), kDeviceKeys,
                                                   cpu.scalar_type(), std::nullopt);
      if (zeros.nbytes() > 0) {
        std::memset(zeros.data_ptr(), 0, zeros.nbytes());
      }
      return zeros;
    }
    TORCH_CHECK(cpu.layout() == c10::kStrided && !cpu.is_quantized() && !cpu.is_nested() &&
                    cpu.key_set().has_backend(c10::BackendComponent::CPUBit) &&
                    !cpu.key_set().has(c10::DispatchKey::MkldnnCPU),
                "hostdev holds dense strided tensors; this op's CPU kernel returned a ",
                cpu.toString(), " with layout ", cpu.layout());
    return with_storage(device_storage(cpu.storage(), exclusive), kDeviceKeys, cpu);
  }

  // An argument the op wrote: if the CPU kernel resized it or gave it
  // another storage, the device tensor follows.
  void write_back(const at::Tensor& dev, const at::Tensor& cpu,
                  const std::unordered_set<c10::StorageImpl*>& exclusive) {
    if (!on_device(dev) || !cpu.defined()) {
      return;
    }
    auto* impl = dev.unsafeGetTensorImpl();
    c10::Storage target = device_storage(cpu.storage(), exclusive);
    if (target.unsafeGetStorageImpl() != impl->storage().unsafeGetStorageImpl()) {
      impl->set_storage_keep_dtype(std::move(target));
    }
    if (dev.sizes() != cpu.sizes() || dev.strides() != cpu.strides() ||
        dev.storage_offset() != cpu.storage_offset()) {
      impl->set_sizes_and_strides(cpu.sizes(), cpu.strides(), cpu.storage_offset());
    }
  }

 private:
  struct Entry {
    c10::Storage device;
    c10::Storage cpu;
    const void* data;  // the CPU storage's bytes when made (the device's)
    size_t nbytes;
  };

  c10::Storage cpu_storage(const c10::Storage& dev) {
    auto* dev_impl = dev.unsafeGetStorageImpl();
    auto hit = cpu_of_.find(dev_impl);
    if (hit != cpu_of_.end()) {
      return hit->second;
    }
    // mutable_data: a copy-on-write storage gets its own bytes before a
    // kernel may write them
    void* data = dev.nbytes() ? dev_impl->mutable_data() : nullptr;
    c10::Storage cpu(c10::Storage::use_byte_size_t(), dev.nbytes(),
                     c10::DataPtr(data, c10::Device(c10::DeviceType::CPU)),
                     c10::GetCPUAllocator(), dev_impl->resizable());
    cpu_of_.emplace(dev_impl, cpu);
    storages_.emplace(cpu.unsafeGetStorageImpl(), Entry{dev, cpu, data, dev.nbytes()});
    return cpu;
  }

  c10::Storage device_storage(const c10::Storage& cpu,
                              const std::unordered_set<c10::StorageImpl*>& exclusive) {
    auto* cpu_impl = cpu.unsafeGetStorageImpl();
    auto hit = storages_.find(cpu_impl);
    if (hit != storages_.end()) {
      return hit->second.device;
    }
    auto fresh = adopted_.find(cpu_impl);
    if (fresh != adopted_.end()) {
      return fresh->second;
    }
    c10::Storage dev = adopt(cpu, exclusive.count(cpu_impl) > 0);
    adopted_.emplace(cpu_impl, dev);
    return dev;
  }

  std::unordered_map<c10::TensorImpl*, at::Tensor> tensors_;            // device -> CPU
  std::unordered_map<c10::TensorImpl*, at::Tensor> device_of_tensor_;   // CPU -> device
  std::unordered_map<c10::StorageImpl*, c10::Storage> cpu_of_;          // device -> CPU
  std::unordered_map<c10::StorageImpl*, Entry> storages_;               // CPU alias -> entry
  std::unordered_map<c10::StorageImpl*, c10::Storage> adopted_;         // fresh CPU -> device
};

// ---------------------------------------------------------------------------
// Kernels hostdev implements itself: allocation, copies, views, resizing.

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<c10::ScalarType> dtype,
                               std::optional<c10::Layout> layout,
                               std::optional<c10::Device> device_opt,
                               std::optional<bool> pin_memory,
                               std::optional<c10::MemoryFormat> memory_format) {
  check_device(device_opt);
  TORCH_CHECK(c10::layout_or_default(layout) == c10::Layout::Strided,
              "hostdev: only strided tensors, got layout ", c10::layout_or_default(layout));
  TORCH_CHECK(!c10::pinned_memory_or_default(pin_memory),
              "hostdev: pin_memory is for CPU tensors (hostdev memory is host memory already)");
  return at::detail::empty_generic(size, allocator(), kDeviceKeys,
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride,
                         std::optional<c10::ScalarType> dtype, std::optional<c10::Layout> layout,
                         std::optional<c10::Device> device_opt, std::optional<bool> pin_memory) {
  check_device(device_opt);
  TORCH_CHECK(c10::layout_or_default(layout) == c10::Layout::Strided,
              "hostdev: only strided tensors, got layout ", c10::layout_or_default(layout));
  TORCH_CHECK(!c10::pinned_memory_or_default(pin_memory),
              "hostdev: pin_memory is for CPU tensors (hostdev memory is host memory already)");
  return at::detail::empty_strided_generic(size, stride, allocator(), kDeviceKeys,
                                           c10::dtype_or_default(dtype));
}

// src -> dst where either (or both) is a hostdev tensor: the CPU copy
// kernel on aliases (dtype conversion, broadcasting and overlap included).
at::Tensor copy_from(const at::Tensor& src, const at::Tensor& dst, bool non_blocking) {
  TORCH_CHECK(src.defined() && dst.defined(), "hostdev: copy_ of an undefined tensor");
  for (const auto* t : {&src, &dst}) {
    TORCH_CHECK(t->device().is_privateuseone() || t->device().is_cpu(),
                "hostdev: copies go between hostdev and cpu tensors, got one on ", t->device());
  }
  HostViews views;
  at::Tensor d = views.to_cpu(dst);
  d.copy_(views.to_cpu(src), non_blocking);
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& src, const at::Tensor& dst) {
  dst.resize_(src.sizes());
  return copy_from(src, dst, false);
}

at::Scalar local_scalar_dense(const at::Tensor& self) {
  HostViews views;
  return at::native::_local_scalar_dense_cpu(views.to_cpu(self));
}

at::Tensor as_strided(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride,
                      std::optional<int64_t> storage_offset) {
  return at::native::as_strided_tensorimpl(self, size, stride, storage_offset);
}

at::Tensor view(const at::Tensor& self, c10::IntArrayRef size) {
  return at::native::view(self, size);
}

at::Tensor reshape_alias(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride) {
  return at::native::_reshape_alias(self, size, stride);
}

at::Tensor unfold(const at::Tensor& self, int64_t dimension, int64_t size, int64_t step) {
  return at::native::unfold(self, dimension, size, step);
}

const at::Tensor& resize_(const at::Tensor& self, c10::IntArrayRef size,
                          std::optional<c10::MemoryFormat> memory_format) {
  // grows the storage through its own allocator (hostdev's)
  return at::native::resize_(self, size, memory_format);
}

at::Tensor& set_storage_offset(at::Tensor& self, c10::Storage source, int64_t storage_offset,
                               c10::IntArrayRef size, c10::IntArrayRef stride) {
  TORCH_CHECK(source.device().is_privateuseone(),
              "hostdev: set_ expects a hostdev storage, got one on ", source.device());
  return at::native::set_storage_cpu_(self, std::move(source), storage_offset, size, stride);
}

at::Tensor& set_storage(at::Tensor& self, c10::Storage source) {
  const int64_t n = static_cast<int64_t>(source.nbytes() / self.dtype().itemsize());
  return set_storage_offset(self, std::move(source), 0, {n}, {});
}

at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) {
  return at::native::set_tensor_(self, source);
}

at::Tensor& set_empty(at::Tensor& self) {
  c10::Storage empty(c10::Storage::use_byte_size_t(), 0, allocator(), true);
  return set_storage_offset(self, std::move(empty), 0, {0}, {});
}

// ---------------------------------------------------------------------------
// The fallback: every other aten op, on the CPU kernels.

bool is_generator_arg(const c10::Argument& arg) {
  const auto& type = arg.type();
  if (type->kind() == c10::TypeKind::GeneratorType) {
    return true;
  }
  return type->kind() == c10::TypeKind::OptionalType &&
         type->expectRef<c10::OptionalType>().getElementType()->kind() ==
             c10::TypeKind::GeneratorType;
}

bool holds_tensor(const c10::IValue& v) {
  if (v.isTensor() || v.isTensorList() || v.isOptionalTensorList()) {
    return true;
  }
  if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) {
      if (holds_tensor(e)) {
        return true;
      }
    }
  }
  if (v.isList()) {
    for (const auto& e : v.toListRef()) {
      if (holds_tensor(e)) {
        return true;
      }
    }
  }
  return v.isGenericDict() || v.isObject();
}

// Mixing: what CUDA refuses, hostdev refuses with the same words. A CPU
// tensor may join a hostdev op only as a 0-dim value (TensorIterator's CPU
// scalars) or as an index in a Tensor?[] list (advanced indexing moves
// indices to the device).
void check_devices(const c10::OperatorHandle& op, const std::vector<c10::IValue>& args) {
  const auto& schema = op.schema();
  bool device_seen = false;
  std::string other;           // the first argument on another device
  c10::Device other_device(c10::DeviceType::CPU);
  auto look = [&](const at::Tensor& t, const std::string& name, bool index) {
    if (!t.defined()) {
      return;
    }
    if (t.device().is_privateuseone()) {
      device_seen = true;
    } else if (other.empty() && !(t.device().is_cpu() && (index || t.dim() == 0))) {
      other = name;
      other_device = t.device();
    }
  };
  for (size_t i = 0; i < args.size(); ++i) {
    const auto& name = schema.arguments()[i].name();
    const auto& v = args[i];
    if (v.isTensor()) {
      look(v.toTensor(), name, false);
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) {
        look(t, name, false);
      }
    } else if (v.isOptionalTensorList()) {
      for (const std::optional<at::Tensor>& t : v.toOptionalTensorList()) {
        if (t.has_value()) {
          look(*t, name, true);
        }
      }
    }
  }
  TORCH_CHECK(!device_seen || other.empty(), "Expected all tensors to be on the same device, "
              "but found at least two devices, hostdev:0 and ", other_device,
              "! (when checking argument `", other, "` of ", schema.operator_name(), ")");
}

at::Generator cpu_generator_for(const c10::IValue& v, const c10::OperatorHandle& op) {
  if (v.isNone()) {
    return cpu_generator_of(default_generator());
  }
  const at::Generator gen = v.toGenerator();
  TORCH_CHECK(gen.device().is_privateuseone(), "Expected a 'hostdev' device type for generator "
              "but found '", gen.device().type(), "' (in ", op.schema().operator_name(), ")");
  return cpu_generator_of(gen);
}

void hostdev_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n_args = schema.arguments().size();
  const size_t n_rets = schema.returns().size();
  const size_t first = stack->size() - n_args;
  std::vector<c10::IValue> args(stack->begin() + first, stack->end());

  for (const auto& v : args) {
    if ((v.isTuple() || v.isGenericDict() || v.isObject() ||
         (v.isList() && !v.isTensorList() && !v.isOptionalTensorList())) && holds_tensor(v)) {
      // tensors somewhere the aliasing below does not look: torch's own
      // (copying) CPU fallback handles any schema
      at::native::cpu_fallback(op, stack);
      return;
    }
  }
  check_devices(op, args);

  HostViews views;
  std::vector<c10::IValue> cpu_args(args.size());
  for (size_t i = 0; i < n_args; ++i) {
    const auto& v = args[i];
    c10::IValue& slot = (*stack)[first + i];
    if (v.isTensor()) {
      slot = views.to_cpu(v.toTensor());
    } else if (v.isTensorList()) {
      c10::List<at::Tensor> list;
      list.reserve(v.toTensorList().size());
      for (const at::Tensor& t : v.toTensorList()) {
        list.push_back(views.to_cpu(t));
      }
      slot = list;
    } else if (v.isOptionalTensorList()) {
      c10::List<std::optional<at::Tensor>> list;
      for (const std::optional<at::Tensor>& t : v.toOptionalTensorList()) {
        list.push_back(t.has_value() ? std::optional<at::Tensor>(views.to_cpu(*t)) : t);
      }
      slot = list;
    } else if (v.isDevice() && v.toDevice().is_privateuseone()) {
      slot = c10::Device(c10::DeviceType::CPU);
    } else if (is_generator_arg(schema.arguments()[i])) {
      slot = cpu_generator_for(v, op);
    }
    cpu_args[i] = slot;
  }

  try {
    op.callBoxed(stack);
  } catch (c10::NotImplementedError& e) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "hostdev runs ", schema.operator_name(),
                                " on its CPU kernel, and the CPU has none: ", e.what_without_backtrace());
  }

  // storages only the results hold may be adopted without a copy
  std::unordered_map<c10::StorageImpl*, long> result_refs;
  std::unordered_set<c10::TensorImpl*> counted;
  auto count = [&](const at::Tensor& t) {
    if (t.defined() && t.has_storage() && counted.insert(t.unsafeGetTensorImpl()).second) {
      result_refs[t.storage().unsafeGetStorageImpl()] += 1;
    }
  };
  const size_t rets = stack->size() - n_rets;
  for (size_t j = 0; j < n_rets; ++j) {
    const auto& r = (*stack)[rets + j];
    if (r.isTensor()) {
      count(r.toTensor());
    } else if (r.isTensorList()) {
      for (const at::Tensor& t : r.toTensorList()) {
        count(t);
      }
    }
  }
  std::unordered_set<c10::StorageImpl*> exclusive;
  for (auto [impl, refs] : result_refs) {
    if (static_cast<long>(c10::raw::intrusive_ptr::use_count(impl)) == refs) {
      exclusive.insert(impl);
    }
  }

  views.sync_grown_storages();
  for (size_t i = 0; i < n_args; ++i) {
    const auto* alias = schema.arguments()[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) {
      continue;
    }
    const auto& v = args[i];
    if (v.isTensor()) {
      views.write_back(v.toTensor(), cpu_args[i].toTensor(), exclusive);
    } else if (v.isTensorList()) {
      auto dev = v.toTensorList();
      auto cpu = cpu_args[i].toTensorList();
      for (size_t k = 0; k < dev.size(); ++k) {
        views.write_back(dev[k], cpu[k], exclusive);
      }
    }
  }

  for (size_t j = 0; j < n_rets; ++j) {
    c10::IValue& r = (*stack)[rets + j];
    if (r.isTensor()) {
      r = views.to_device(r.toTensor(), exclusive);
    } else if (r.isTensorList()) {
      c10::List<at::Tensor> list;
      for (const at::Tensor& t : r.toTensorList()) {
        list.push_back(views.to_device(t, exclusive));
      }
      r = list;
    } else if (r.isOptionalTensorList()) {
      c10::List<std::optional<at::Tensor>> list;
      for (const std::optional<at::Tensor>& t : r.toOptionalTensorList()) {
        list.push_back(t.has_value() ? std::optional<at::Tensor>(views.to_device(*t, exclusive))
                                     : t);
      }
      r = list;
    }
  }
}

} // namespace
} // namespace kf_hostdev

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  using namespace kf_hostdev;
  m.impl("empty.memory_format", TORCH_FN(empty_memory_format));
  m.impl("empty_strided", TORCH_FN(empty_strided));
  m.impl("_copy_from", TORCH_FN(copy_from));
  m.impl("_copy_from_and_resize", TORCH_FN(copy_from_and_resize));
  m.impl("_local_scalar_dense", TORCH_FN(local_scalar_dense));
  m.impl("as_strided", TORCH_FN(as_strided));
  m.impl("view", TORCH_FN(view));
  m.impl("_reshape_alias", TORCH_FN(reshape_alias));
  m.impl("unfold", TORCH_FN(unfold));
  m.impl("resize_", TORCH_FN(resize_));
  m.impl("set_.source_Storage", TORCH_FN(set_storage));
  m.impl("set_.source_Storage_storage_offset", TORCH_FN(set_storage_offset));
  m.impl("set_.source_Tensor", TORCH_FN(set_tensor));
  m.impl("set_", TORCH_FN(set_empty));
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&kf_hostdev::hostdev_fallback>());
}
