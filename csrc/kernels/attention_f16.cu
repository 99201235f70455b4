// fp16 instances of the paged decode attention kernels (one dtype per translation unit).
#include "kernels/attention_kernels.cuh"

namespace spotserve {
namespace kern {
template cudaError_t launch_decode_attention_typed<__half>(const DecodeAttnParams&, cudaStream_t);
}  // namespace kern
}  // namespace spotserve
