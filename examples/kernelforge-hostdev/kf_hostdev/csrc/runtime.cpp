// The device runtime of hostdev: its allocator, device guard, hooks and
// random number generator, and the Python module kf_hostdev._C.
//
// Nothing here takes the GIL: the allocator and the guard are called from
// any thread, inside kernels, with or without the GIL held.

#include "hostdev.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/GeneratorForPrivateuseone.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/extension.h>

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

namespace kf_hostdev {

void check_index(c10::DeviceIndex index) {
  TORCH_CHECK_VALUE(
      index == -1 || index == kIndex,
      "hostdev has one device (index 0), got device index ", int(index));
}

namespace {

using c10::CachingDeviceAllocator::DeviceStats;
using c10::CachingDeviceAllocator::StatType;

constexpr size_t kAlign = 64;
// Each block starts with a header holding its size, so the deleter (which
// gets only a pointer) can keep the statistics.
constexpr size_t kHeader = kAlign;

constexpr size_t kAggregate = static_cast<size_t>(StatType::AGGREGATE);

// ---------------------------------------------------------------------------
// Allocator: aligned host memory with CUDA-style statistics, so that
// torch.hostdev.memory_allocated() and torch.accelerator's memory queries work.

class HostdevAllocator final : public c10::DeviceAllocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) {
      return c10::DataPtr(nullptr, device());
    }
    const size_t body = (n + kAlign - 1) / kAlign * kAlign;
    TORCH_CHECK_WITH(
        OutOfMemoryError, body <= SIZE_MAX - kHeader,
        "hostdev: cannot allocate ", n, " bytes");
    void* base = nullptr;
    if (posix_memalign(&base, kAlign, kHeader + body) != 0 || base == nullptr) {
      TORCH_CHECK_WITH(
          OutOfMemoryError, false, "hostdev: out of memory allocating ", n,
          " bytes (host memory)");
    }
    auto* header = static_cast<size_t*>(base);
    header[0] = n;
    header[1] = kHeader + body;
    record(n, kHeader + body, +1);
    return c10::DataPtr(
        static_cast<char*>(base) + kHeader, base, &release, device());
  }

  c10::DeleterFnPtr raw_deleter() const override {
    // the context (the block with its header) is not the data pointer
    return nullptr;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // -- DeviceAllocator: nothing is cached, there are no streams
  bool initialized() override {
    return true;
  }
  void emptyCache(c10::MempoolId_t /*unused*/) override {}
  void recordStream(const c10::DataPtr& /*unused*/, c10::Stream /*unused*/) override {}

  DeviceStats getDeviceStats(c10::DeviceIndex index) override {
    check_index(index);
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }
  void resetAccumulatedStats(c10::DeviceIndex index) override {
    check_index(index);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* a : arrays()) {
      (*a)[kAggregate].reset_accumulated();
    }
  }
  void resetPeakStats(c10::DeviceIndex index) override {
    check_index(index);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* a : arrays()) {
      (*a)[kAggregate].reset_peak();
    }
  }
  std::pair<size_t, size_t> getMemoryInfo(c10::DeviceIndex index) override {
    check_index(index);
    const long page = sysconf(_SC_PAGESIZE);
    const long total = sysconf(_SC_PHYS_PAGES);
    const long avail = sysconf(_SC_AVPHYS_PAGES);
    return {size_t(avail) * size_t(page), size_t(total) * size_t(page)};
  }

 private:
  static void release(void* base) {
    const auto* header = static_cast<const size_t*>(base);
    instance().record(header[0], header[1], -1);
    std::free(base);
  }

  void record(size_t requested, size_t reserved, int sign) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto change = [sign](c10::CachingDeviceAllocator::StatArray& a, size_t v) {
      sign > 0 ? a[kAggregate].increase(v) : a[kAggregate].decrease(v);
    };
    change(stats_.allocation, 1);
    change(stats_.segment, 1);
    change(stats_.active, 1);
    change(stats_.requested_bytes, requested);
    change(stats_.allocated_bytes, reserved);
    change(stats_.active_bytes, reserved);
    change(stats_.reserved_bytes, reserved);
  }

  std::array<c10::CachingDeviceAllocator::StatArray*, 7> arrays() {
    return {&stats_.allocation, &stats_.segment, &stats_.active,
            &stats_.requested_bytes, &stats_.allocated_bytes,
            &stats_.active_bytes, &stats_.reserved_bytes};
  }

 public:
  static HostdevAllocator& instance();

  void adopted(size_t nbytes, int sign) {
    record(nbytes, nbytes, sign);
  }

 private:
  std::mutex mutex_;
  DeviceStats stats_;
};

HostdevAllocator& HostdevAllocator::instance() {
  // never destroyed: storages may be freed during interpreter shutdown
  static auto* a = new HostdevAllocator();
  return *a;
}

// ---------------------------------------------------------------------------
// Device guard: one device and one (synchronous) stream. Every kernel has
// finished when it returns, so synchronising is a no-op, every stream is
// that one stream, and an event has happened as soon as it is recorded.

struct HostdevGuardImpl final : public c10::impl::DeviceGuardImplInterface {
  static constexpr c10::DeviceType static_type = c10::DeviceType::PrivateUse1;

  c10::DeviceType type() const override {
    return static_type;
  }
  c10::Device exchangeDevice(c10::Device d) const override {
    check(d);
    return device();
  }
  c10::Device getDevice() const override {
    return device();
  }
  void setDevice(c10::Device d) const override {
    check(d);
  }
  void uncheckedSetDevice(c10::Device /*unused*/) const noexcept override {}
  c10::Stream getStream(c10::Device d) const override {
    check(d);
    return c10::Stream(c10::Stream::DEFAULT, device());
  }
  c10::Stream getDefaultStream(c10::Device d) const override {
    return getStream(d);
  }
  c10::Stream getStreamFromGlobalPool(c10::Device d, bool /*high*/) const override {
    return getStream(d);
  }
  c10::Stream getNewStream(c10::Device d, int /*priority*/) const override {
    return getStream(d);
  }
  c10::Stream exchangeStream(c10::Stream /*unused*/) const override {
    return c10::Stream(c10::Stream::DEFAULT, device());
  }
  void record(void** event, const c10::Stream& stream, const c10::DeviceIndex index,
              const c10::EventFlag /*unused*/) const override {
    check_index(index);
    check(stream.device());
    if (*event == nullptr) {
      *event = &recorded_;   // any non-null handle: nothing to wait for
    }
  }
  void block(void* /*unused*/, const c10::Stream& /*unused*/) const override {}
  bool queryEvent(void* /*unused*/) const override {
    return true;
  }
  void synchronizeEvent(void* /*unused*/) const override {}
  void destroyEvent(void* /*unused*/, const c10::DeviceIndex /*unused*/) const noexcept override {}
  c10::DeviceIndex deviceCount() const noexcept override {
    return 1;
  }
  bool queryStream(const c10::Stream& /*unused*/) const override {
    return true;
  }
  void synchronizeStream(const c10::Stream& /*unused*/) const override {}
  void synchronizeDevice(const c10::DeviceIndex index) const override {
    check_index(index);
  }

 private:
  static void check(c10::Device d) {
    TORCH_CHECK(
        d.type() == static_type, "hostdev's device guard got a ", d.type(),
        " device");
    check_index(d.index());
  }
  static inline char recorded_ = 0;
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, HostdevGuardImpl);

// ---------------------------------------------------------------------------
// Generator: a hostdev generator holds a CPU generator (Mersenne twister,
// seeded like torch's CPU one) and the fallback hands that to the CPU
// kernels, so a seed gives the same numbers as on the CPU.

struct HostdevGenerator final : public c10::GeneratorImpl {
  explicit HostdevGenerator(at::Generator cpu)
      : c10::GeneratorImpl(
            kf_hostdev::device(), c10::DispatchKeySet(c10::DispatchKey::PrivateUse1)),
        cpu_(std::move(cpu)) {}

  void set_current_seed(uint64_t seed) override {
    std::lock_guard<std::mutex> lock(cpu_.mutex());
    cpu_.set_current_seed(seed);
  }
  void set_offset(uint64_t offset) override {
    std::lock_guard<std::mutex> lock(cpu_.mutex());
    cpu_.set_offset(offset);
  }
  uint64_t get_offset() const override {
    std::lock_guard<std::mutex> lock(cpu_.mutex());
    return cpu_.get_offset();
  }
  uint64_t current_seed() const override {
    std::lock_guard<std::mutex> lock(cpu_.mutex());
    return cpu_.current_seed();
  }
  uint64_t seed() override {
    std::lock_guard<std::mutex> lock(cpu_.mutex());
    return cpu_.seed();
  }
  void set_state(const c10::TensorImpl& state) override {
    std::lock_guard<std::mutex> lock(cpu_.mutex());
    cpu_.unsafeGetGeneratorImpl()->set_state(state);
  }
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override {
    std::lock_guard<std::mutex> lock(cpu_.mutex());
    return cpu_.unsafeGetGeneratorImpl()->get_state();
  }

  const at::Generator& cpu() const {
    return cpu_;
  }

 private:
  HostdevGenerator* clone_impl() const override {
    std::lock_guard<std::mutex> lock(cpu_.mutex());
    return new HostdevGenerator(cpu_.clone());
  }

  mutable at::Generator cpu_;  // mutable: its mutex is locked in const methods
};

at::Generator new_generator(c10::DeviceIndex index) {
  check_index(index);
  return at::make_generator<HostdevGenerator>(at::detail::createCPUGenerator());
}

// ---------------------------------------------------------------------------
// Hooks: what torch asks a PrivateUse1 backend at run time.

struct HostdevHooks final : public at::PrivateUse1HooksInterface {
  bool isBuilt() const override {
    return true;
  }
  bool isAvailable() const override {
    return true;
  }
  bool hasPrimaryContext(c10::DeviceIndex /*unused*/) const override {
    return true;
  }
  void init() const override {}
  c10::DeviceIndex deviceCount() const override {
    return 1;
  }
  void setCurrentDevice(c10::DeviceIndex index) const override {
    check_index(index);
  }
  c10::DeviceIndex getCurrentDevice() const override {
    return kIndex;
  }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex index) const override {
    check_index(index);
    return kIndex;
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex /*unused*/) const override {
    return kIndex;
  }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex index) const override {
    check_index(index);
    return default_generator();
  }
  at::Generator getNewGenerator(c10::DeviceIndex index) const override {
    return new_generator(index);
  }
  at::Device getDeviceFromPtr(void* /*unused*/) const override {
    return device();
  }
  bool isPinnedPtr(const void* /*unused*/) const override {
    return false;
  }
  at::Allocator* getPinnedMemoryAllocator() const override {
    // hostdev memory is host memory already: nothing to pin for it
    return c10::GetCPUAllocator();
  }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t nbytes) const override {
    auto* impl = storage.unsafeGetStorageImpl();
    TORCH_CHECK(impl->resizable(), "hostdev: trying to resize a storage that is not resizable");
    c10::DataPtr data = allocator()->allocate(nbytes);
    const size_t keep = std::min(nbytes, impl->nbytes());
    if (keep > 0) {
      std::memcpy(data.get(), impl->data(), keep);
    }
    impl->set_data_ptr_noswap(std::move(data));
    impl->set_nbytes(nbytes);
  }
};

struct Registration {
  Registration() {
    c10::SetAllocator(c10::DeviceType::PrivateUse1, &HostdevAllocator::instance());
    at::RegisterPrivateUse1HooksInterface(new HostdevHooks());
  }
};
const Registration registration;

} // namespace

void track_adopted(size_t nbytes, int sign) {
  HostdevAllocator::instance().adopted(nbytes, sign);
}

c10::Allocator* allocator() {
  return &HostdevAllocator::instance();
}

const at::Generator& default_generator() {
  static const at::Generator gen = new_generator(kIndex);
  return gen;
}

at::Generator cpu_generator_of(const at::Generator& gen) {
  TORCH_CHECK(gen.device().is_privateuseone(), "expected a hostdev generator, got a ",
              gen.device().type(), " one");
  return static_cast<const HostdevGenerator*>(gen.unsafeGetGeneratorImpl())->cpu();
}

} // namespace kf_hostdev

namespace {

py::dict memory_stats() {
  auto s = kf_hostdev::HostdevAllocator::instance().getDeviceStats(kf_hostdev::kIndex);
  py::dict out;
  auto put = [&out](const char* name, const c10::CachingDeviceAllocator::StatArray& a) {
    const auto& st = a[kf_hostdev::kAggregate];
    for (auto [key, v] : {std::pair<const char*, int64_t>{"current", st.current},
                          {"peak", st.peak}, {"allocated", st.allocated}, {"freed", st.freed}}) {
      out[py::str(std::string(name) + ".all." + key)] = v;
    }
  };
  put("allocation", s.allocation);
  put("requested_bytes", s.requested_bytes);
  put("allocated_bytes", s.allocated_bytes);
  put("reserved_bytes", s.reserved_bytes);
  put("active_bytes", s.active_bytes);
  return out;
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hostdev: a PyTorch device (PrivateUse1) on host memory";
  m.def("_default_generator", [] { return kf_hostdev::default_generator(); });
  m.def("_memory_stats", &memory_stats);
  m.def("_reset_peak_memory_stats", [] {
    kf_hostdev::HostdevAllocator::instance().resetPeakStats(kf_hostdev::kIndex);
  });
  m.def("_reset_accumulated_memory_stats", [] {
    kf_hostdev::HostdevAllocator::instance().resetAccumulatedStats(kf_hostdev::kIndex);
  });
  m.def("_memory_info", [] {
    return kf_hostdev::HostdevAllocator::instance().getMemoryInfo(kf_hostdev::kIndex);
  });
}
