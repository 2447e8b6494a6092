// hostdev: an out-of-tree PyTorch device (the PrivateUse1 dispatch key)
// whose memory is ordinary host memory. What the two translation units
// share: runtime.cpp holds the allocator, device guard, hooks and
// generator; ops.cpp the aten kernels and the fallback through the CPU.
#pragma once

#include <ATen/core/Generator.h>
#include <c10/core/Allocator.h>
#include <c10/core/Device.h>

namespace kf_hostdev {

// One device: index 0.
constexpr c10::DeviceIndex kIndex = 0;

inline c10::Device device() {
  return c10::Device(c10::DeviceType::PrivateUse1, kIndex);
}

// Fails with a clear error unless `index` names the device (-1: the current one).
void check_index(c10::DeviceIndex index);

// The allocator every hostdev storage comes from (64-byte aligned host memory).
c10::Allocator* allocator();

// Host memory a device storage adopted from a CPU result (no copy): counted
// in the allocator's statistics like its own blocks (sign: +1 taken, -1 given back).
void track_adopted(size_t nbytes, int sign);

// The device's default generator (a hostdev Generator).
const at::Generator& default_generator();

// The CPU generator a hostdev generator draws from: random ops run on the
// CPU kernels, which take CPU generators.
at::Generator cpu_generator_of(const at::Generator& gen);

} // namespace kf_hostdev
