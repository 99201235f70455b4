// Launch planning for the paged decode attention: split-K partitioning and group tiling.
#include <algorithm>
#include <cstdlib>

#include "kernels/launch.h"
#include "kernels/vec.cuh"

namespace spotserve {
namespace kern {

template <typename T>
cudaError_t launch_decode_attention_typed(const DecodeAttnParams& p, cudaStream_t stream);

namespace {

int tpt_for(int head_dim) {  // mirrors AttnShape<D>::kTPT
  const int nvec = head_dim / 8;
  for (int t = 16; t > 1; t >>= 1)
    if (nvec % t == 0) return t;
  return 1;
}

int max_group_tile(int head_dim) {  // mirrors AttnShape<D>::kMaxGroupTile
  const int e = head_dim / tpt_for(head_dim);
  return 32 / e >= 4 ? 4 : 32 / e >= 2 ? 2 : 1;
}

struct DeviceInfo {
  int sms = 108;
  bool clusters = false;
};

DeviceInfo device_info() {
  DeviceInfo info;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return info;
  cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  const char* env = std::getenv("SPOTSERVE_ATTN_CLUSTER");
  info.clusters = major >= 9 && !(env != nullptr && env[0] == '0');
  return info;
}

constexpr int kMaxCluster = 8;  // the portable thread-block cluster size

}  // namespace

bool decode_attention_supports(int head_dim) {
  switch (head_dim) {
    case 8: case 16: case 32: case 64: case 80: case 96: case 128: case 256: return true;
    default: return false;
  }
}

cudaError_t plan_decode_attention(DecodeAttnParams& p, int max_context_len, int partition_size) {
  if (!decode_attention_supports(p.head_dim) || p.kv_heads <= 0 || p.num_heads % p.kv_heads) return cudaErrorInvalidValue;
  const int group = p.num_heads / p.kv_heads;
  int tile = 1;
  while (tile < group && tile < max_group_tile(p.head_dim)) tile <<= 1;
  p.group_tile = tile;
  p.head_tiles = (group + tile - 1) / tile;
  const int ctx = std::max(1, max_context_len);
  const DeviceInfo dev = device_info();
  int part;
  if (partition_size > 0) {
    part = partition_size;
    p.dynamic = 0;
  } else {
    // About four CTAs per multiprocessor: enough loads in flight to stream at full bandwidth;
    // more splits only add merge work (measured on an H100: batch 32 x 512 tokens runs fastest
    // unsplit, batch 1 wants 8-16 splits). At least 16 tokens per split.
    const long base = static_cast<long>(p.num_seqs) * p.kv_heads * p.head_tiles;
    const long target = 4L * dev.sms;
    int want = static_cast<int>(std::max(1L, (target + base - 1) / base));
    want = std::min(want, std::max(1, ctx / 16));
    // Up to kMaxCluster splits merge inside a cluster, with no second kernel; prefer that
    // unless it would leave each CTA a very long partition.
    if (dev.clusters && want > kMaxCluster && (ctx + kMaxCluster - 1) / kMaxCluster <= 512) want = kMaxCluster;
    part = (ctx + want - 1) / want;
    p.dynamic = 1;  // the device re-divides each sequence's actual context among the splits
  }
  p.partition = part;
  p.num_splits = std::max(1, (ctx + part - 1) / part);
  p.cluster = (dev.clusters && p.num_splits > 1 && p.num_splits <= kMaxCluster) ? p.num_splits : 0;
  return cudaSuccess;
}

cudaError_t launch_decode_attention(DType dt, const DecodeAttnParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  switch (dt) {
    case DType::kHalf: return launch_decode_attention_typed<__half>(p, stream);
    case DType::kBFloat16: return launch_decode_attention_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kern
}  // namespace spotserve
